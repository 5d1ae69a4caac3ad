"""Tokenizers: the article's bark words, UTF-8 bytes, and byte-level BPE (Hugging Face ``tokenizers``).

Each has ``encode``, ``decode``, ``vocab_size`` and ``to_dict``; ``tokenizer_from_dict`` rebuilds one
from its ``to_dict`` (saved with models and token files). ``barkgpt.data`` re-exports these names.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Sequence


class DataError(ValueError):
    """The data cannot be used; the message says what is wrong and how to fix it."""


class BarkTokenizer:
    """Word-level tokenizer over the article's 9-token bark vocabulary."""

    kind = "bark"
    VOCAB = ("<PAD>", "<EOS>", "woof", "arf", "ruff", "grrr", "User:", "Assistant:", "speak")
    pad_id, eos_id = 0, 1

    def __init__(self):
        self.stoi = {w: i for i, w in enumerate(self.VOCAB)}

    @property
    def vocab_size(self) -> int:
        return len(self.VOCAB)

    def encode(self, text: str) -> List[int]:
        ids = []
        for w in text.split():
            if w not in self.stoi:
                raise DataError(f"{w!r} is not in the bark vocabulary {list(self.VOCAB)}")
            ids.append(self.stoi[w])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Words for ``ids``, padding left out; an id outside the vocabulary (a model built with
        a larger vocab_size can sample one) shows as ``<unk:ID>`` instead of failing."""
        n = len(self.VOCAB)
        return " ".join(self.VOCAB[i] if 0 <= i < n else f"<unk:{i}>"
                        for i in map(int, ids) if i != self.pad_id)

    def to_dict(self) -> Dict:
        return {"type": self.kind, "vocab": list(self.VOCAB)}


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train, works on any text."""

    kind = "byte"
    pad_id = None
    eos_id = None

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> Dict:
        return {"type": self.kind}


def _hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("the BPE tokenizer needs the 'tokenizers' package (Hugging Face): "
                        "pip install 'barkgpt[bpe]'") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE, GPT-2's scheme (every UTF-8 text encodes, no unknown token), trained on
    your own text by Hugging Face ``tokenizers``. Id 0 is the end-of-text token."""

    kind = "bpe"
    EOS = "<|endoftext|>"
    pad_id = None
    MIN_VOCAB = 257  # the 256 byte symbols + end of text

    def __init__(self, tokenizer):
        self._tk = tokenizer
        self.eos_id = tokenizer.token_to_id(self.EOS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              length: Optional[int] = None, progress: bool = True) -> "BPETokenizer":
        """Learn merges from ``texts`` (an iterable of strings, e.g. chunks of a file) until the
        vocabulary has ``vocab_size`` tokens, or no pair occurs ``min_frequency`` times."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < cls.MIN_VOCAB:
            raise DataError(f"a BPE vocabulary needs at least {cls.MIN_VOCAB} tokens (256 bytes + end of "
                            f"text), got vocab_size={vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise DataError(f"min_frequency must be a positive integer, got {min_frequency!r}")
        hf = _hf_tokenizers()
        tk = hf.Tokenizer(hf.models.BPE())
        tk.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                         special_tokens=[cls.EOS], show_progress=progress,
                                         initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tk)

    @classmethod
    def from_dict(cls, d: Dict) -> "BPETokenizer":
        hf = _hf_tokenizers()
        try:
            return cls(hf.Tokenizer.from_str(json.dumps(d["tokenizer"])))
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise DataError(f"the saved BPE tokenizer cannot be read: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self._tk.encode(text).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._tk.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> Dict:
        return {"type": self.kind, "tokenizer": json.loads(self._tk.to_str())}


def tokenizer_from_dict(d: Dict):
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "bark":
        return BarkTokenizer()
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_dict(d)
    raise DataError(f"unknown tokenizer description {str(d)[:200]}")
