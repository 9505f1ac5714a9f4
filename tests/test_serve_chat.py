"""Tests of widemoe.serve.model_files: chat templates render exactly as transformers 5.24's
`apply_chat_template(..., tokenize=False)` does, templates are found where transformers finds them, the
sandbox and `raise_exception` become `TemplateError`s, and every EOS id of generation_config.json counts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import tokenizers
import transformers
from tokenizers import models

from widemoe.config import ConfigError
from widemoe.presets import get_preset
from widemoe.serve.model_files import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    TemplateError,
    eos_token_ids,
    model_directory,
)
from widemoe.serve.protocol import ChatMessage

# A Qwen/ChatML-like template written for this test: whitespace control both ways, trim_blocks and
# lstrip_blocks at work, a namespace, loop controls, raise_exception, tojson and the bos_token variable.
CHATML = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message['role'] }}{% if message.name is defined %} name={{ message.name | tojson }}{% endif %}

    {% if message['role'] == 'tool' %}
{{ {'result': message['content'], 'turn': ns.turns} | tojson }}<|im_end|>
    {% else %}
{{ message['content'] | trim }}<|im_end|>
    {% endif %}
{% endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# tojson's keyword arguments, which transformers' filter takes and jinja's own does not.
TOJSON_ARGS = (
    "{{ messages | tojson(indent=2, sort_keys=True) }}|{{ messages | tojson(separators=(',', ':')) }}"
    "|{{ eos_token }}{% if add_generation_prompt %}>>{% endif %}"
)

SYSTEM = ChatMessage("system", "You are terse.")
CHATS = {
    "one user turn": [ChatMessage("user", "Hello")],
    "system, multi-turn": [
        SYSTEM,
        ChatMessage("user", "What is 2+2?"),
        ChatMessage("assistant", "  4  \n"),
        ChatMessage("user", "And 3+3?"),
    ],
    "non-ascii, name, tool": [
        ChatMessage("user", "Grüße, 世界 — ça va? 🙂", name="Zoë"),
        ChatMessage("assistant", "Très bien."),
        ChatMessage("tool", 'He said "hi" <b>&amp;</b> ünd \\ back'),
    ],
}


def hf_tokenizer(chat_template: str) -> transformers.PreTrainedTokenizerFast:
    """transformers' own tokenizer around a tiny word-level vocabulary; only its templating is used."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


def as_dicts(messages: list[ChatMessage]) -> list[dict]:
    return [dataclasses.asdict(m) for m in messages]  # name=None included: transformers drops it too


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer directory per template, written by transformers' own save_pretrained."""
    out = {}
    for name, template in (("chatml", CHATML), ("tojson", TOJSON_ARGS)):
        d = tmp_path_factory.mktemp(name)
        hf_tokenizer(template).save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", ["chatml", "tojson"])
def test_render_equals_transformers(saved_dirs, template, chat, add_generation_prompt):
    directory = saved_dirs[template]
    ours = ChatTemplate.for_model(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(
        as_dicts(CHATS[chat]), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.render(CHATS[chat], add_generation_prompt=add_generation_prompt) == theirs
    assert ours.special_tokens["bos_token"] == "<s>"


def test_transformers_saved_the_template_as_a_jinja_file(saved_dirs):
    # transformers 5 writes chat_template.jinja and leaves chat_template out of tokenizer_config.json
    directory = saved_dirs["chatml"]
    assert (directory / "chat_template.jinja").read_text(encoding="utf-8") == CHATML
    assert "chat_template" not in json.loads((directory / "tokenizer_config.json").read_text())
    assert ChatTemplate.for_model(directory).source == str(directory / "chat_template.jinja")


def test_template_in_tokenizer_config(tmp_path):
    hf_tokenizer(CHATML).save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config_file = tmp_path / "tokenizer_config.json"
    config = {**json.loads(config_file.read_text()), "chat_template": CHATML}
    config_file.write_text(json.dumps(config))
    ours = ChatTemplate.for_model(tmp_path)
    assert ours.source == str(config_file)
    chat = CHATS["system, multi-turn"]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        as_dicts(chat), tokenize=False, add_generation_prompt=True
    )
    assert ours.render(chat) == theirs
    assert theirs.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>\n")
    # older configs store special tokens as AddedToken dicts: the same text comes out
    config["bos_token"] = {"content": "<s>", "lstrip": False, "rstrip": False, "special": True}
    config_file.write_text(json.dumps(config))
    assert ChatTemplate.for_model(tmp_path).render(chat) == theirs


def test_jinja_file_wins_over_tokenizer_config_as_in_transformers(tmp_path):
    hf_tokenizer("JINJA FILE").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "CONFIG"}))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == "JINJA FILE"
    assert ChatTemplate.for_model(tmp_path).render([ChatMessage("user", "hi")]) == "JINJA FILE"


def write_config(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", **fields}))
    return directory


def test_template_list_uses_default(tmp_path):
    write_config(
        tmp_path,
        chat_template=[
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "D{{ messages | length }}{{ eos_token }}"},
        ],
    )
    assert ChatTemplate.for_model(tmp_path).render([SYSTEM, ChatMessage("user", "x")]) == "D2</s>"


def test_template_list_without_default_is_refused(tmp_path):
    templates = [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]
    write_config(tmp_path, chat_template=templates)
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json: .*\['rag', 'tool_use'\].*'default'"):
        ChatTemplate.for_model(tmp_path)


def test_chat_template_flag_wins(tmp_path):
    directory = write_config(tmp_path / "model", chat_template="CONFIG")
    (directory / "chat_template.jinja").write_text("JINJA")
    flag = tmp_path / "mine.jinja"
    flag.write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}{{ eos_token }}")
    t = ChatTemplate.for_model(directory, template_file=flag)
    assert t.source == str(flag)
    assert t.render([SYSTEM, ChatMessage("user", "q")]) == "[system][user]</s>"


def test_default_template_when_nothing_is_present(tmp_path):
    chat = [SYSTEM, ChatMessage("user", "hi")]
    expected = "<|system|>\nYou are terse.\n<|user|>\nhi\n"
    for t in (ChatTemplate.for_model(None), ChatTemplate.for_model(write_config(tmp_path))):
        assert t.is_default and t.text == DEFAULT_CHAT_TEMPLATE
        assert t.render(chat) == expected + "<|assistant|>\n"
        assert t.render(chat, add_generation_prompt=False) == expected


def test_raise_exception_message_reaches_the_client(saved_dirs):
    t = ChatTemplate.for_model(saved_dirs["chatml"])
    with pytest.raises(TemplateError) as info:
        t.render([ChatMessage("developer", "be nice"), ChatMessage("user", "hi")])
    assert str(info.value) == "Unknown role: developer"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__base__ }}",
        "{{ dict.__call__.__globals__ }}",
        "{% set ns = namespace(_hidden=1) %}{{ ns._hidden }}",
        "{{ messages.append(1) }}",  # immutable sandbox: no mutating a list the server passed in
    ],
)
def test_sandbox_refusals_are_template_errors(template):
    with pytest.raises(TemplateError, match="sandbox"):
        ChatTemplate(template, "test").render([ChatMessage("user", "hi")])


def test_unsafe_attribute_alone_renders_nothing():
    # jinja's sandbox makes an unsafe attribute undefined (it raises once used, as above): no leak
    assert ChatTemplate("[{{ messages.__class__ }}]").render([ChatMessage("user", "hi")]) == "[]"


def test_other_render_failures_are_template_errors():
    with pytest.raises(TemplateError, match=r"chat template \(t\.jinja\) failed: UndefinedError"):
        ChatTemplate("{{ messages[3].content.upper() }}", "t.jinja").render([ChatMessage("user", "hi")])


def test_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("ok\n{% if messages %}no end")
    with pytest.raises(ConfigError, match=rf"{bad}: chat template syntax error at line 2"):
        ChatTemplate.for_model(None, template_file=bad)


def test_strftime_now_is_available():
    year = ChatTemplate("{{ strftime_now('%Y') }}").render([ChatMessage("user", "hi")])
    assert year.isdigit() and int(year) >= 2024


def write_generation_config(directory: Path, payload: str) -> Path:
    (directory / "generation_config.json").write_text(payload)
    return directory


def test_eos_ids_from_an_int(tmp_path):
    write_generation_config(tmp_path, json.dumps({"eos_token_id": 5, "bos_token_id": 1}))
    assert eos_token_ids(tmp_path, 2) == [5, 2]
    assert eos_token_ids(tmp_path, 5) == [5]


def test_eos_ids_from_a_list_deduplicated_in_order(tmp_path):
    write_generation_config(tmp_path, json.dumps({"eos_token_id": [7, 3, 7]}))
    assert eos_token_ids(tmp_path, 3) == [7, 3]
    assert eos_token_ids(tmp_path, 9) == [7, 3, 9]


def test_eos_ids_without_the_file(tmp_path):
    assert eos_token_ids(tmp_path, 4) == [4]
    assert eos_token_ids(None, 4) == [4]
    assert eos_token_ids(None, None) == []
    write_generation_config(tmp_path, json.dumps({"do_sample": True}))
    assert eos_token_ids(tmp_path, 4) == [4]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ('{"eos_token_id": "x"}', r'eos_token_id must be a token id \(int >= 0\) or a list of them, got "x"'),
        ('{"eos_token_id": [1, -2]}', r"eos_token_id must be .* got \[1, -2\]"),
        ('{"eos_token_id": true}', r"eos_token_id must be .* got true"),
        ('{"eos_token_id": 1,}', r"not a readable JSON file"),
        ("[1, 2]", r"expected a JSON object at the top level, got list"),
    ],
)
def test_malformed_generation_config(tmp_path, payload, match):
    write_generation_config(tmp_path, payload)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'generation_config.json'}: {match}"):
        eos_token_ids(tmp_path, 0)


def test_model_directory(tmp_path):
    from widemoe.hf.resolve import ResolvedModel

    config = get_preset("tiny")
    assert model_directory(ResolvedModel("tiny", "preset", config)) is None
    assert model_directory(ResolvedModel("d", "directory", config, weights=tmp_path)) == tmp_path
    tok = tmp_path / "tok"
    assert model_directory(ResolvedModel("d", "directory", config, weights=tmp_path, tokenizer=tok)) == tok
