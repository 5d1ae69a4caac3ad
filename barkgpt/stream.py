"""Streaming text out of a model: token ids in as they are generated, printable text out.

Used with ``BarkGPT.generate(..., on_token=...)``, which calls back once per generated step
whatever makes the steps (full recomputation today, a KV cache later).
"""

from __future__ import annotations

from typing import Iterable, List

_REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental decoding with any barkgpt tokenizer: ``push(ids)`` returns the text those ids
    add to what was returned before. The ids so far are decoded as a whole each time, so the
    concatenated pushes equal ``tokenizer.decode(all ids)``: a multi-byte character split across
    byte-level tokens (an emoji, CJK) is held back while it decodes as U+FFFD and shown once
    complete, and word tokenizers keep their separators."""

    def __init__(self, tokenizer, ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids: List[int] = [int(i) for i in ids]
        self.shown = 0  # characters of the decoded text already returned

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        stable = len(text)
        while stable > self.shown and text[stable - 1] == _REPLACEMENT:
            stable -= 1
        out = text[self.shown:stable]
        self.shown = max(self.shown, stable)
        return out

    def flush(self) -> str:
        """What is left, held-back characters included (the end of the stream)."""
        text = self.tokenizer.decode(self.ids)
        out = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return out
