"""What the server reads from a model directory besides the weights: the chat template and the EOS ids.

`ChatTemplate` renders `/v1/chat/completions` messages into the prompt text the way transformers 5.24's
`apply_chat_template(..., tokenize=False)` does (transformers/utils/chat_template_utils.py): a jinja2
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])`, a
`tojson` filter that keeps non-ASCII text (`ensure_ascii=False`), the globals `raise_exception` and
`strftime_now`, guarded `dict`/`namespace` globals, and as variables `messages`, `add_generation_prompt`,
`tools`/`documents` (None) and the named special tokens of tokenizer_config.json (`bos_token`, ...).
Chat templates come from the Hub and are untrusted code: the sandbox refuses attribute access such as
`''.__class__`, and every error a template raises while rendering becomes a `TemplateError` (a
ValueError) that the server answers with a 400.

The rendered text already holds the template's BOS (and every other control token): the server must
tokenize it WITHOUT adding special tokens, or the prompt starts with two BOS tokens (sgl-project/sglang#888;
shared/reference/serving.md "Chat templates").

`eos_token_ids` gives every id generation stops on: generation_config.json's `eos_token_id` (an int or a
list) plus the model config's. Files that cannot be read raise `ConfigError` (a ValueError) naming the
file, the field and what was expected; the CLI turns those into messages.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from widemoe.config import ConfigError
from widemoe.data.tokenizer import CONFIG_FILE, _token_str
from widemoe.serve.protocol import ChatMessage

if TYPE_CHECKING:
    from widemoe.hf.resolve import ResolvedModel

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "DEFAULT_CHAT_TEMPLATE",
    "GENERATION_CONFIG_FILE",
    "ChatTemplate",
    "TemplateError",
    "eos_token_ids",
    "model_directory",
]

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a single template
GENERATION_CONFIG_FILE = "generation_config.json"
# The named special tokens transformers passes to a template (PreTrainedTokenizerBase.special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# widemoe's own turn format for its trained runs and presets, which carry no chat template: it is not any
# published model's format. Each turn is "<|role|>\ncontent\n"; the generation prompt opens an assistant turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_SOURCE = "widemoe's default chat template"


class TemplateError(ValueError):
    """A chat template failed while rendering a request: `raise_exception` in the template (its message
    as is), a sandbox refusal, an undefined variable misused, ... The server answers it with a 400."""


class _RaisedByTemplate(jinja2.exceptions.TemplateError):
    """What `raise_exception(message)` raises inside jinja, kept apart so its message reaches the client
    unchanged (templates use it to say which message orders or roles they accept)."""


# ---- the jinja environment (transformers 5.24's, rebuilt) ----------------------------------------------


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Not jinja's own tojson: that one escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` as templates see it: calling it and `fromkeys`, without the type's attributes to climb."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace` refusing underscore-prefixed attributes, so a template cannot store or reach
    CPython internals through one."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # jinja's own signature trick: `self` comes from args, so `namespace(self=...)` is a plain attribute.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template cannot store the underscore-prefixed attribute {name!r}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


# ---- reading the model directory ---------------------------------------------------------------------


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e})") from None


def _config_template(value: object, path: Path) -> str:
    """tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"} of which
    "default" is the one a chat without tools uses (transformers' get_chat_template)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named: dict[str, str] = {}
        for i, entry in enumerate(value):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ConfigError(
                    f"{path}: chat_template[{i}] must be an object with string 'name' and "
                    f"'template', got {json.dumps(entry)[:80]}"
                )
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise ConfigError(
                f"{path}: chat_template lists templates {sorted(named)} but none named 'default'"
            )
        return named["default"]
    raise ConfigError(
        f"{path}: chat_template must be a string or a list of {{'name', 'template'}} objects, "
        f"got {type(value).__name__}"
    )


def _special_tokens(config: dict) -> dict[str, str]:
    """The named special tokens as strings; absent ones are left undefined for the template, as in
    transformers."""
    tokens = {name: _token_str(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: tok for name, tok in tokens.items() if tok is not None}


def _message_dict(message: ChatMessage) -> dict[str, str]:
    # transformers drops keys whose value is None: templates test `'name' in message`, not `is none`.
    d = {"role": message.role, "content": message.content}
    if message.name is not None:
        d["name"] = message.name
    return d


# ---- the chat template -------------------------------------------------------------------------------


class ChatTemplate:
    """A compiled chat template plus the special tokens it may use; `source` names where it came from.

    `render` returns text to tokenize WITHOUT adding special tokens: the template writes the BOS itself.
    """

    def __init__(self, text: str, source: str = DEFAULT_SOURCE, special_tokens: dict[str, str] | None = None):
        self.text, self.source = text, source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._compiled = _environment().from_string(text)
        except jinja2.exceptions.TemplateSyntaxError as e:
            message = f"{source}: chat template syntax error at line {e.lineno}: {e.message}"
            raise ConfigError(message) from None

    @classmethod
    def for_model(cls, directory: Path | None, *, template_file: Path | None = None) -> ChatTemplate:
        """The template a model directory asks for, looked for in this order:

        1. `template_file` (the `--chat-template FILE` flag: a jinja file);
        2. `directory/chat_template.jinja` (transformers 5 saves a single template there; when both exist
           transformers lets this file win over the tokenizer config, and so does widemoe);
        3. `chat_template` in `directory/tokenizer_config.json` (a string or a list of named templates);
        4. `DEFAULT_CHAT_TEMPLATE`, widemoe's own format for runs without a template.

        The special tokens always come from `directory/tokenizer_config.json` when it exists.
        """
        config: dict = {}
        config_path = Path(directory) / CONFIG_FILE if directory is not None else None
        if config_path is not None and config_path.is_file():
            config = _read_json_object(config_path)
        special = _special_tokens(config)
        if template_file is not None:
            path = Path(template_file)
            return cls(_read_text(path, "chat template"), str(path), special)
        if directory is not None and (Path(directory) / CHAT_TEMPLATE_FILE).is_file():
            path = Path(directory) / CHAT_TEMPLATE_FILE
            return cls(_read_text(path, "chat template"), str(path), special)
        if config_path is not None and config.get("chat_template") is not None:
            return cls(_config_template(config["chat_template"], config_path), str(config_path), special)
        return cls(DEFAULT_CHAT_TEMPLATE, DEFAULT_SOURCE, special)

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_SOURCE

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; a template that fails raises `TemplateError`."""
        chat = [_message_dict(m) for m in messages]
        try:
            return self._compiled.render(
                # special tokens first: the explicit variables win a name clash, as in transformers
                **self.special_tokens,
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except _RaisedByTemplate as e:
            raise TemplateError(e.message or "the chat template refused the messages") from None
        except SecurityError as e:
            raise TemplateError(f"chat template ({self.source}) refused by the sandbox: {e}") from None
        except Exception as e:  # noqa: BLE001 - an untrusted template can raise anything from inside jinja
            raise TemplateError(f"chat template ({self.source}) failed: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.source}, special_tokens={sorted(self.special_tokens)})"


# ---- EOS ids and the model directory -----------------------------------------------------------------


def _is_token_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def eos_token_ids(directory: Path | None, config_eos: int | None) -> list[int]:
    """Every id generation stops on: generation_config.json's `eos_token_id` (an int or a list of ints;
    instruct models often list several) in `directory` when the file exists, then `config_eos`;
    de-duplicated, first occurrence kept."""
    ids: list[int] = []
    path = Path(directory) / GENERATION_CONFIG_FILE if directory is not None else None
    if path is not None and path.is_file():
        value = _read_json_object(path).get("eos_token_id")
        if _is_token_id(value):
            ids.append(value)
        elif isinstance(value, list) and all(_is_token_id(v) for v in value):
            ids.extend(value)
        elif value is not None:
            raise ConfigError(
                f"{path}: eos_token_id must be a token id (int >= 0) or a list of them, "
                f"got {json.dumps(value)[:80]}"
            )
    if config_eos is not None:
        ids.append(config_eos)
    return list(dict.fromkeys(ids))


def model_directory(resolved: ResolvedModel) -> Path | None:
    """The directory holding tokenizer_config.json and generation_config.json: the tokenizer's, else the
    weights'; None for a preset or a bare config file (random weights, no files around them)."""
    return resolved.tokenizer or resolved.weights
