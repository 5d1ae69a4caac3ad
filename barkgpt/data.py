"""Datasets: the article's bark corpus (built in) and plain text / token files.

Text files are read as UTF-8 bytes (vocabulary 256), or turned once into a ``.bin`` token
file by ``tokenize_file`` (``barkgpt tokenize``) with a byte-level BPE tokenizer trained on
them, which then trains like any token file.

Every dataset draws its training batches from a ``torch.Generator`` it is handed, so the
generator's state *is* the data position: training checkpoints save it and resume exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

# The tokenizers live in barkgpt/tokenizer.py; their names stay importable from here (callers,
# pickles of old imports).
from .tokenizer import (BarkTokenizer, BPETokenizer, ByteTokenizer, DataError,  # noqa: F401
                        tokenizer_from_dict)


# ---- text files -> token files ------------------------------------------------------------------

def _check_data_path(path: str, missing_hint: str = "",
                     kinds: str = "a .txt file or a .bin token file") -> int:
    """Size of a data file that exists and is not a directory or empty. ``missing_hint`` is
    added to the error for a missing file; ``kinds`` names what the caller accepts."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist{missing_hint}")
    if os.path.isdir(path):
        raise DataError(f"data path {path!r} is a directory; give {kinds}")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"data file {path!r} is empty")
    return size


def _check_text(path: str, block_bytes: int = 1 << 22) -> None:
    """A text file must not look binary (NUL bytes in its first block) and must be UTF-8 from
    its first byte to its last (a character cut off at the end of the file is an error too).
    Streams the file in blocks, so memory stays flat whatever its size."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # of the block being decoded
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            if offset == 0 and b"\x00" in block:
                raise DataError(f"data file {path!r} looks binary (it contains NUL bytes); give UTF-8 "
                                f"text, or a .bin token file with a .json sidecar")
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"data file {path!r} is not UTF-8 text (bad byte at offset "
                                f"{offset - pending + e.start}); convert it, e.g. iconv -t UTF-8") from None
            if not block:
                return
            offset += len(block)


# A seam: a whitespace character right after one that is not. GPT-2's pre-tokenizer (a regex
# with no lookbehind) has always ended a word, number or punctuation run there and starts
# afresh, so text cut at a seam encodes exactly like the whole (whitespace runs, CRLF, NBSP,
# ideographic spaces included: tests/test_bpe.py fuzzes it).
# "Whitespace" is the tokenizer's (Unicode White_Space); Python's \s also counts \x1c-\x1f, so the
# character before a seam must be neither, and the seam itself one of the tokenizer's.
_SEAM = re.compile("(?<=\\S)[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


def _last_seam(text: str) -> int:
    """Index of the last seam of ``text`` (0: none), in time linear in the distance searched."""
    width = 1 << 12
    while True:
        lo = max(0, len(text) - width)
        last = None
        for last in _SEAM.finditer(text, lo):  # noqa: B007 - only the last one is wanted
            pass
        if last is not None:
            return last.start()
        if lo == 0:
            return 0
        width *= 4


def _next_seam(text: str, start: int) -> int:
    """Index of the first seam of ``text`` at or after ``start`` (len(text): none)."""
    m = _SEAM.search(text, start)
    return m.start() if m else len(text)


def text_chunks(path: str, chunk_bytes: int = 1 << 22,
                on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of about ``chunk_bytes``, cut only at seams (see
    _SEAM), so that encoding the pieces one by one gives exactly the tokens of the whole file
    (8 chunks without one whitespace character after another character, minified data
    rather than text, are cut anyway).
    ``on_bytes(n)`` is told every n bytes read (progress)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"data file {path!r} is not UTF-8 text (bad byte near offset "
                                f"{offset + e.start}); convert it, e.g. iconv -t UTF-8") from None
            offset += len(block)
            if on_bytes is not None and block:
                on_bytes(len(block))
            if not block:
                if text:
                    yield text
                return
            cut = _last_seam(text)
            if cut == 0 and len(text) < 8 * chunk_bytes:
                carry = text
                continue
            cut = cut or len(text)
            carry = text[cut:]
            yield text[:cut]


def _split_lines(text: str, piece_chars: int = 1 << 16) -> List[str]:
    """``text`` as consecutive pieces of about ``piece_chars`` cut at seams (see text_chunks),
    for encode_batch, which encodes the pieces in parallel."""
    out, start = [], 0
    while start < len(text):
        end = _next_seam(text, start + piece_chars) if start + piece_chars < len(text) else len(text)
        out.append(text[start:end])
        start = end
    return out


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True)


def tokenize_file(path: str, out: Optional[str] = None, vocab_size: int = 8192, tokenizer=None,
                  min_frequency: int = 2, overwrite: bool = False, progress: bool = True) -> str:
    """Turn a UTF-8 text file into a token file for training: trains a byte-level BPE tokenizer
    with ``vocab_size`` tokens on the file (unless a ``tokenizer`` is given), encodes the whole
    file and writes ``out`` (default: the input path with ``.bin``), token ids as uint16 (or
    uint32 for vocabularies over 65536), plus the sidecar ``.json`` holding the vocabulary size
    and the tokenizer, so that ``TextCorpus``, checkpoints and ``barkgpt generate`` use it.
    Both files appear complete or not at all. Returns the ``.bin`` path."""
    size = _check_data_path(path, kinds="a UTF-8 text file")
    if path.endswith(".bin"):
        raise DataError(f"{path!r} is already a token file")
    _check_text(path)  # before training: a bad byte late in the file would waste the training
    out = out or os.path.splitext(path)[0] + ".bin"
    if not out.endswith(".bin"):
        raise DataError(f"the token file must end in .bin, got {out!r}")
    meta_path = os.path.splitext(out)[0] + ".json"
    if os.path.abspath(meta_path) == os.path.abspath(path) or os.path.abspath(out) == os.path.abspath(path):
        raise DataError(f"the token file {out!r} or its sidecar would overwrite the input {path!r}; pass out=")
    for p in (out, meta_path):
        if os.path.exists(p) and not overwrite:
            raise DataError(f"{p!r} exists; remove it or pass overwrite=True (--force)")
    if tokenizer is None:
        n_chunks = max(1, math.ceil(size / (1 << 22)))
        # 64 KB pieces: the trainer holds the pre-tokens of every piece it has in flight.
        pieces = (p for text in text_chunks(path) for p in _split_lines(text))
        tokenizer = BPETokenizer.train(pieces, vocab_size, min_frequency=min_frequency,
                                       length=n_chunks * 64, progress=progress)
    vocab = tokenizer.vocab_size
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda ts: [tokenizer.encode(t) for t in ts])
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=folder)
    tmp_meta = None
    bar = _progress(size, f"tokenizing {os.path.basename(path)}", progress)
    try:
        n_tokens = 0
        with os.fdopen(fd, "wb") as f:
            for text in text_chunks(path, on_bytes=bar.update if bar is not None else None):
                pieces = _split_lines(text)
                for k in range(0, len(pieces), 16):  # 1 MB at a time: encodings are bulky
                    for ids in encode_batch(pieces[k:k + 16]):
                        np.asarray(ids, dtype=dtype).tofile(f)
                        n_tokens += len(ids)
            f.flush()
            os.fsync(f.fileno())
        if n_tokens < 2:
            raise DataError(f"{path!r} encodes to {n_tokens} token(s): too little text to train on")
        meta = {"vocab_size": vocab, "dtype": np.dtype(dtype).name, "tokens": n_tokens,
                "source": os.path.abspath(path), "source_bytes": size, "tokenizer": tokenizer.to_dict()}
        mfd, tmp_meta = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
        with os.fdopen(mfd, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        for t in (tmp, tmp_meta):  # mkstemp makes 0600 files: give them the usual permissions
            os.chmod(t, 0o666 & ~umask)
        os.replace(tmp, out)
        os.replace(tmp_meta, meta_path)
    finally:
        if bar is not None:
            bar.close()
        for t in (tmp, tmp_meta):
            if t is not None and os.path.exists(t):
                os.remove(t)
    return out


# ---- the bark corpus -----------------------------------------------------------------------

class BarkCorpus:
    """``User: speak Assistant:`` then 2..10 barks (uniform count, uniform bark), ``<EOS>``,
    padded with ``<PAD>`` to ``block_size + 1`` tokens; the model reads the first
    ``block_size`` tokens and predicts the next one at each position. Pad targets are ignored.
    """

    name = "bark"
    MIN_BARKS, MAX_BARKS = 2, 10
    PROMPT = ("User:", "speak", "Assistant:")
    BARKS = ("woof", "arf", "ruff", "grrr")

    def __init__(self, block_size: int = 32, val_sequences: int = 2048, val_seed: int = 1234):
        self.tokenizer = BarkTokenizer()
        self.block_size = block_size
        longest = len(self.PROMPT) + self.MAX_BARKS + 1
        if block_size + 1 < longest:
            raise DataError(f"the bark corpus needs block_size >= {longest - 1} (its longest sequence "
                            f"has {longest} tokens), got {block_size}")
        self.ignore_index = self.tokenizer.pad_id
        self.vocab_size = self.tokenizer.vocab_size
        self._prompt = torch.tensor(self.tokenizer.encode(" ".join(self.PROMPT)))
        self._barks = torch.tensor(self.tokenizer.encode(" ".join(self.BARKS)))
        g = torch.Generator().manual_seed(val_seed)
        self.val = self.sample(val_sequences, g)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n sequences (n, block_size + 1), drawn with ``generator``."""
        L = self.block_size + 1
        counts = torch.randint(self.MIN_BARKS, self.MAX_BARKS + 1, (n,), generator=generator)
        barks = self._barks[torch.randint(0, len(self.BARKS), (n, self.MAX_BARKS), generator=generator)]
        out = torch.full((n, L), self.tokenizer.pad_id, dtype=torch.long)
        p = len(self.PROMPT)
        out[:, :p] = self._prompt
        pos = torch.arange(self.MAX_BARKS)
        body = torch.where(pos[None, :] < counts[:, None], barks, torch.full_like(barks, self.tokenizer.pad_id))
        out[:, p:p + self.MAX_BARKS] = body
        out[torch.arange(n), p + counts] = self.tokenizer.eos_id
        return out

    def get_batch(self, batch_size: int, generator: torch.Generator,
                  rows: Optional[slice] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` sequences drawn with ``generator``; ``rows`` keeps only those rows
        (a data-parallel rank's share), the generator advancing as for the whole batch."""
        seq = self.sample(batch_size, generator)
        if rows is not None:
            seq = seq[rows]
        return seq[:, :-1], seq[:, 1:]

    # Bark tokens are words, not bytes: no bits per byte for this corpus.
    token_bytes = None

    def eval_windows(self, requested: Optional[int] = None) -> int:
        """How many held-out sequences an evaluation of ``requested`` (None: all) reads."""
        n = int(self.val.shape[0])
        return n if requested is None else max(1, min(int(requested), n))

    def eval_batches(self, batch_size: int, windows: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The first ``windows`` held-out sequences (None: all of them), ``batch_size`` at a time."""
        n = self.eval_windows(windows)
        for i in range(0, n, batch_size):
            seq = self.val[i:min(i + batch_size, n)]
            yield seq[:, :-1], seq[:, 1:]

    # The optimal predictor knows the generator: after k barks it predicts <EOS> with
    # P(n = k | n >= k) = 1 / (MAX - k + 1) (uniform n), else each bark equally.
    def _optimal_nll(self, k: int) -> Tuple[float, float]:
        """(-log p(next bark), -log p(EOS)) after k barks; inf where impossible."""
        if k < self.MIN_BARKS:
            return math.log(len(self.BARKS)), math.inf
        if k >= self.MAX_BARKS:
            return math.inf, 0.0
        p_eos = 1.0 / (self.MAX_BARKS - k + 1)
        return -math.log((1 - p_eos) / len(self.BARKS)), -math.log(p_eos)

    def optimal_loss(self, sequences: Optional[torch.Tensor] = None) -> float:
        """Best achievable mean loss per predicted token. With ``sequences`` (rows as from
        ``sample``), the optimal predictor's loss on exactly those; without, the expectation
        over the generator (E[sum of -log p] / E[number of targets])."""
        if sequences is None:
            nvals = range(self.MIN_BARKS, self.MAX_BARKS + 1)
            tot_nll = tot_cnt = 0.0
            for n in nvals:
                tot_nll += self._sequence_nll(n)
                tot_cnt += n + len(self.PROMPT)  # targets: speak, Assistant:, n barks, EOS
            return tot_nll / tot_cnt
        counts = (sequences[:, len(self.PROMPT):] != self.tokenizer.pad_id).sum(1) - 1  # minus EOS
        nll = sum(self._sequence_nll(int(n)) for n in counts)
        cnt = int((counts + len(self.PROMPT)).sum())
        return nll / cnt

    def _sequence_nll(self, n: int) -> float:
        nll = 0.0  # "speak" and "Assistant:" are certain
        for k in range(n):
            nll += self._optimal_nll(k)[0]
        return nll + self._optimal_nll(n)[1]

    def unigram_loss(self) -> float:
        """Loss of the best context-free predictor (token frequencies), a baseline to beat."""
        seq = self.val[:, 1:]
        tgt = seq[seq != self.ignore_index]
        freq = torch.bincount(tgt, minlength=self.vocab_size).double()
        p = freq / freq.sum()
        return float(-(p[tgt].log()).mean())

    def describe(self) -> Dict:
        return {"name": self.name, "block_size": self.block_size, "val_sequences": int(self.val.shape[0])}


# ---- text files ------------------------------------------------------------------------------

_SIDECAR_FIX = ('{"vocab_size": N, "dtype": "uint16"} (or "uint32"), or make the token file and its '
                'sidecar again with barkgpt tokenize')


def _read_sidecar(path: str, meta_path: str):
    """(dtype, vocab_size, tokenizer or None) from the ``.json`` sidecar of the token file ``path``."""
    if not os.path.exists(meta_path):
        raise DataError(f"token file {path!r} needs a sidecar {meta_path!r} with {_SIDECAR_FIX}")

    def bad(what: str) -> DataError:
        return DataError(f"sidecar {meta_path!r} of token file {path!r}: {what}; it should hold {_SIDECAR_FIX}")

    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    except OSError as e:
        raise bad(f"cannot be read ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise bad(f"not a JSON object (got {type(meta).__name__})")
    if "vocab_size" not in meta:
        raise bad("no vocab_size")
    vocab_size = meta["vocab_size"]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise bad(f"vocab_size must be a positive integer, got {vocab_size!r}")
    name = meta.get("dtype", "uint16")
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except (TypeError, ValueError):
        dtype = None
    # token ids are integers: a float dtype would read the file as garbage ids
    if dtype is None or dtype.kind not in "ui":
        raise bad(f"dtype must be an integer type such as uint16 or uint32, got {name!r}")
    tokens = meta.get("tokens")  # written by tokenize_file: a shorter file was cut off
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)
                               or os.path.getsize(path) != tokens * dtype.itemsize):
        raise DataError(f"token file {path!r} holds {os.path.getsize(path) // dtype.itemsize} tokens but its "
                        f"sidecar {meta_path!r} says {tokens!r}: the file is truncated or not the one the "
                        f"sidecar describes; make it again (barkgpt tokenize)")
    tokenizer = None
    if "tokenizer" in meta:
        try:
            tokenizer = tokenizer_from_dict(meta["tokenizer"])
        except DataError as e:
            raise DataError(f"sidecar {meta_path!r} of token file {path!r}: {e}") from None
    return dtype, vocab_size, tokenizer


def _check_token_ids_in_file(path: str, data: np.ndarray, vocab_size: int, split_at: int,
                             chunk: int = 1 << 24) -> None:
    """Every id of a token file in [0, vocab_size), checked once at load: a bad id would otherwise
    surface only when a batch happens to sample it (as a cross-entropy error, the file unnamed).
    Reads a memory-mapped file in chunks of ``chunk`` tokens, min/max per chunk."""
    unsigned = data.dtype.kind == "u"
    if unsigned and int(np.iinfo(data.dtype).max) < vocab_size:
        return  # no value of the dtype is out of range
    for start in range(0, len(data), chunk):
        part = np.asarray(data[start:start + chunk])
        if part.size == 0 or (int(part.max()) < vocab_size and (unsigned or int(part.min()) >= 0)):
            continue
        i = int(np.argmax((part >= vocab_size) | (part < 0)))
        pos = start + i
        split = "validation" if pos >= split_at else "training"
        raise DataError(f"token file {path!r} holds token id {int(part[i])} at position {pos} (byte offset "
                        f"{pos * data.dtype.itemsize}, in the {split} split), outside the vocabulary of "
                        f"{vocab_size} its sidecar declares (valid ids are 0..{vocab_size - 1}); fix the file "
                        f"or the sidecar's vocab_size (barkgpt tokenize makes both)")


def token_byte_lengths(tokenizer, vocab_size: int) -> Optional[torch.Tensor]:
    """UTF-8 bytes of text each token id stands for (float64, ``vocab_size`` long), so that a
    loss per token converts exactly to bits per byte; None where tokens are not pieces of text
    (the bark words) or the tokenizer is unknown. Special tokens (end of text) count 0 bytes."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        out = torch.zeros(vocab_size, dtype=torch.float64)
        out[:min(256, vocab_size)] = 1.0
        return out
    if kind == "bpe":
        out = torch.zeros(vocab_size, dtype=torch.float64)
        hf = getattr(tokenizer, "_tk", None)
        if hf is not None:
            # byte-level BPE: each character of a token's string is one byte (GPT-2's byte alphabet)
            for piece, i in hf.get_vocab(with_added_tokens=False).items():
                if 0 <= i < vocab_size:
                    out[i] = len(piece)
            special = list(getattr(hf, "get_added_tokens_decoder", dict)())
        else:
            special = []
            for i in range(min(vocab_size, tokenizer.vocab_size)):
                out[i] = len(tokenizer.decode([i]).encode("utf-8"))
        for i in special + [getattr(tokenizer, "eos_id", None)]:
            if i is not None and 0 <= i < vocab_size:
                out[i] = 0.0  # end of text and other special tokens are no text
        return out
    return None


def _open_tokens(path: str, what: str = "data"):
    """(token array, vocab_size, tokenizer) of a text file (bytes) or a .bin token file."""
    size = _check_data_path(path)
    if path.endswith(".bin"):
        meta_path = os.path.splitext(path)[0] + ".json"
        dtype, vocab_size, tokenizer = _read_sidecar(path, meta_path)
        if size % dtype.itemsize:
            raise DataError(f"token file {path!r} is {size} bytes, not a whole number of {dtype} tokens")
        return np.memmap(path, dtype=dtype, mode="r"), vocab_size, tokenizer
    _check_text(path)
    return np.memmap(path, dtype=np.uint8, mode="r"), 256, ByteTokenizer()


class TextCorpus:
    """A UTF-8 text file tokenized as bytes (memory-mapped: the file is the token array), or a
    pre-tokenized ``.bin`` file of integer token ids (uint16, uint32, ...) with a ``.json``
    sidecar giving ``vocab_size`` and ``dtype``.
    The last ``val_fraction`` of the tokens is held out (or ``val_path``, a file of the same
    kind and tokenizer, is the validation set and all of ``path`` trains); training windows are
    drawn at random offsets of the training split, validation windows at fixed offsets."""

    def __init__(self, path: str, block_size: int, val_fraction: Optional[float] = None, eval_windows: int = 256,
                 val_path: Optional[str] = None):
        if val_fraction is None:
            val_fraction = 0.0 if val_path is not None else 0.1
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or \
                not 0 <= val_fraction < 1:
            raise DataError(f"the validation fraction must be a number in [0, 1), got {val_fraction!r}")
        if val_path is not None and val_fraction > 0:
            raise DataError("give either a validation file or a validation fraction of the data, not both")
        self.path = path
        self.name = os.path.basename(path)
        self.block_size = block_size
        self.ignore_index = -100
        self.data, self.vocab_size, self.tokenizer = _open_tokens(path)
        n = len(self.data)
        n_val = int(n * val_fraction)
        self.split_at = n - n_val
        # A split of L tokens holds L - block_size windows of block_size + 1 tokens.
        if self.split_at < block_size + 1 or (n_val and n_val < block_size + 1):
            raise DataError(f"data file {path!r} has {n} tokens, too few for block_size {block_size} "
                            f"with a {val_fraction:.0%} validation split; use a bigger file or a smaller block")
        self.val_path = val_path
        self.val_data = None
        if val_path is not None:
            self.val_data, val_vocab, val_tok = _open_tokens(val_path)
            same = (val_tok is None and self.tokenizer is None) or (
                val_tok is not None and self.tokenizer is not None and val_tok.to_dict() == self.tokenizer.to_dict())
            if not same or path.endswith(".bin") != val_path.endswith(".bin"):
                raise DataError(f"validation file {val_path!r} is not tokenized like the data {path!r}: give a "
                                f"text file for a text file, or a token file made with the same tokenizer")
            self.vocab_size = max(self.vocab_size, val_vocab)
            if len(self.val_data) < block_size + 1:
                raise DataError(f"validation file {val_path!r} has {len(self.val_data)} tokens, too few for "
                                f"block_size {block_size}")
        self.val_fraction = val_fraction
        self.has_val = n_val > 0 or self.val_data is not None
        self.default_eval_windows = eval_windows
        self.token_bytes = token_byte_lengths(self.tokenizer, self.vocab_size)
        if path.endswith(".bin"):
            _check_token_ids_in_file(path, self.data, self.vocab_size, self.split_at)
        if self.val_data is not None and val_path.endswith(".bin"):
            _check_token_ids_in_file(val_path, self.val_data, self.vocab_size, 0)

    def _windows(self, starts: torch.Tensor, data=None) -> Tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        data = self.data if data is None else data
        rows = np.stack([np.asarray(data[s:s + T + 1], dtype=np.int64) for s in starts.tolist()])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    # A window starting at s reads tokens s .. s + block_size (inputs s .. s + T - 1, targets
    # s + 1 .. s + T), so the starts s in [lo, hi - T - 1] are exactly the windows inside the
    # split [lo, hi): every token of it is a target of some window (but the first), and no
    # window reaches into the other split.

    def get_batch(self, batch_size: int, generator: torch.Generator, rows: Optional[slice] = None):
        """Windows at ``batch_size`` random offsets; with ``rows``, only those rows are read from
        the file (a data-parallel rank's share), the generator advancing as for the whole batch."""
        starts = torch.randint(0, self.split_at - self.block_size, (batch_size,), generator=generator)
        if rows is not None:
            starts = starts[rows]
        return self._windows(starts)

    def _eval_split(self):
        """(token array, lo, hi) of the windows evaluation reads."""
        if self.val_data is not None:
            return self.val_data, 0, len(self.val_data)
        if self.has_val:
            return self.data, self.split_at, len(self.data)
        return self.data, 0, self.split_at

    def eval_windows(self, requested: Optional[int] = None) -> int:
        """How many windows an evaluation of ``requested`` windows (None: the default) reads."""
        _, lo, hi = self._eval_split()
        span = hi - lo - self.block_size  # windows in the split, >= 1 (checked in __init__)
        return max(1, min(self.default_eval_windows if requested is None else int(requested), span))

    def eval_batches(self, batch_size: int, windows: Optional[int] = None):
        """``windows`` windows (None: the default, 256) evenly spread over the validation split
        (the validation file, or the training split when there is none), the first and the last
        window included."""
        data, lo, hi = self._eval_split()
        span = hi - lo - self.block_size
        n = self.eval_windows(windows)
        # integer steps: float linspace rounds past the last window on splits over 2**24 tokens
        starts = lo + torch.arange(n, dtype=torch.long) * (span - 1) // max(n - 1, 1)
        for i in range(0, n, batch_size):
            yield self._windows(starts[i:i + batch_size], data)

    def optimal_loss(self, sequences=None):
        return None

    def describe(self) -> Dict:
        d = {"name": self.name, "path": os.path.abspath(self.path), "tokens": int(len(self.data))}
        if self.val_data is not None:
            d.update(val_path=os.path.abspath(self.val_path), val_tokens=int(len(self.val_data)))
        elif self.val_fraction != 0.1:
            d["val_fraction"] = self.val_fraction
        return d


def load_dataset(data: str, block_size: int, val_data: Optional[str] = None, val_fraction: Optional[float] = None):
    """``"bark"`` (built in) or a path to a text / .bin token file; ``val_data``: a validation
    file of the same kind (then all of ``data`` trains), ``val_fraction``: the held-out share of
    ``data`` (default 0.1; 0 evaluates on the training data)."""
    if data == "bark":
        if val_data is not None or val_fraction is not None:
            raise DataError("the bark corpus has its own held-out set: a validation file or fraction applies "
                            "to text and token files only")
        return BarkCorpus(block_size=block_size)
    _check_data_path(data, missing_hint=" (use --data bark for the built-in corpus)")
    if val_data is not None:
        _check_data_path(val_data, kinds="a .txt file or a .bin token file, like --data")
    return TextCorpus(data, block_size=block_size, val_fraction=val_fraction, val_path=val_data)
