"""Incremental detokenization for streamed completions.

A streamed completion must read, joined, exactly as the non-streamed text: the decode of all tokens, cut
at the first stop string. Two things make naive per-token decoding wrong:

- a token may end inside a multi-byte UTF-8 character; decoders then return U+FFFD for the incomplete
  tail (``ModelTokenizer.decode`` uses ``errors="replace"``, tokenizers' ByteLevel decoder is lossy the
  same way), so text is held back while the new tail decodes to U+FFFD;
- a stop string may span tokens, so the longest suffix that could still grow into a stop string is held
  back until it either completes one (the text is cut there) or stops matching (it is emitted).

Decoding each step only a window of the ids (vLLM's ``prefix_offset``/``read_offset``) keeps the cost per
token bounded instead of re-decoding the whole output: the window starts one clean chunk back, so a
decoder whose output for a token depends on the token before it (SentencePiece's leading space) still
decodes the chunk as it would in context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decoder returns for an incomplete byte sequence


class TextStream:
    """Turns token ids, pushed one at a time, into text pieces that are safe to send to a client.

    ``decode`` maps a list of ids to text (e.g. ``ModelTokenizer.decode``); ``stop`` lists the stop
    strings (none may be empty). ``push`` returns the text that can be emitted now (often ""), ``finish``
    the rest. After a stop string appears, ``stopped`` is True, ``text`` ends just before it, and further
    pushes return "".

    Stop strings are checked whenever new whole characters arrive, so ``stopped`` turns True at the
    first token after which the text holds a stop string (cut at the earliest one then present): the
    engine should end the sequence there, as vLLM and OpenAI do. A non-streamed response should be built
    with a TextStream too (``"".join(pieces)`` or ``text``), so both paths cut at the same token.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("stop: an empty stop string would match everywhere; give non-empty strings")
        self._decode = decode
        self._stops = tuple(dict.fromkeys(stop))  # unique, in the order given
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window decoded each step starts here (one clean chunk of context)
        self._read_offset = 0  # ids before this have had their text appended to _clean
        self._prefix_len = 0  # len(decode(ids[prefix_offset:read_offset])), the window's already-read text
        self._clean = ""  # decoded text with no incomplete character at its end
        self._emitted = 0  # characters of _clean already returned by push/finish
        self._finished = False
        self.stopped = False

    @property
    def text(self) -> str:
        """The text emitted so far: after ``finish`` (or a stop), the complete text of the stream."""
        return self._clean[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one token id; return the text that became safe to emit (possibly "")."""
        if self._finished:
            raise RuntimeError("TextStream.push after finish")
        if self.stopped:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_offset :])
        new_text = window[self._prefix_len :]
        if not new_text or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or the tail is a character still arriving over more tokens
        self._clean += new_text
        # Slide the window: the chunk just read becomes the context of the next one.
        if self._read_offset == self._prefix_offset:
            self._prefix_len = len(window)  # the window was exactly the new context
        else:
            self._prefix_len = len(self._decode(self._ids[self._read_offset :]))
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._take(final=False)

    def finish(self) -> str:
        """End the stream: return all text not yet emitted (an incomplete character is emitted as U+FFFD,
        as the non-streamed decode has it), cut at a stop string."""
        if self._finished:
            return ""
        self._finished = True
        if self.stopped:
            return ""
        window = self._decode(self._ids[self._prefix_offset :])
        self._clean += window[self._prefix_len :]
        self._read_offset = len(self._ids)
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        """Return _clean's unemitted text up to the first stop string, or, without one, up to the suffix
        that may still become a stop string (all of it when ``final``)."""
        # No stop string can start before _emitted: it would have been held back as a possible prefix.
        found = (self._clean.find(s, self._emitted) for s in self._stops)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._clean = self._clean[:cut]
            end = cut
        elif final:
            end = len(self._clean)
        else:
            end = len(self._clean) - self._held_suffix_len()
        piece = self._clean[self._emitted : end]
        self._emitted = end
        return piece

    def _held_suffix_len(self) -> int:
        """Length of the longest unemitted suffix of _clean that is a proper prefix of a stop string."""
        pending = len(self._clean) - self._emitted
        longest = min(max((len(s) for s in self._stops), default=1) - 1, pending)
        for k in range(longest, 0, -1):
            tail = self._clean[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
