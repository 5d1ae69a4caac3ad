"""Byte-level BPE: training on a text file, the token file it writes (exactly the tokens of the
whole text, whatever the chunking), the sidecar, errors, and the CLI from text to a sample."""

import json
import os
import random

import numpy as np
import pytest

from barkgpt.cli import main
from barkgpt.data import (BPETokenizer, DataError, TextCorpus, _split_lines, text_chunks, tokenize_file,
                          tokenizer_from_dict)


def _text(n_lines=1500, seed=0):
    # Words with accents, CJK and emoji; runs of newlines and spaces, tabs, a no-break space and
    # CRLF line ends: every place where a cut between chunks could change the pre-tokenization.
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "über", "café", "naïve", "你好", "世界", "🙂",
             "42", "3.14", "don't", "it's", "\u00a0", "\t", "  ", "x\u3000y"]
    seps = ["\n", "\n\n", "\n\n\n", " \n", "\n ", "\r\n", "\n\t"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 10))) + rng.choice(seps)
                   for _ in range(n_lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    text = _text()
    src = d / "corpus.txt"
    src.write_bytes(text.encode("utf-8"))
    out = tokenize_file(str(src), vocab_size=400, progress=False)
    return text, src, out


def test_token_file_is_the_whole_text_encoded(corpus):
    text, src, out = corpus
    assert out == str(src.with_suffix(".bin"))
    meta = json.loads(src.with_suffix(".json").read_text())
    tok = tokenizer_from_dict(meta["tokenizer"])
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == meta["vocab_size"] <= 400
    assert tok.vocab_size > 300  # the merges were learned, not just the 257 base symbols
    ids = np.fromfile(out, dtype=meta["dtype"])
    assert meta["dtype"] == "uint16" and meta["tokens"] == len(ids)
    assert ids.tolist() == tok.encode(text)
    assert tok.decode(ids.tolist()) == text  # byte-level: every character round-trips
    assert len(ids) < 0.6 * len(text.encode("utf-8"))  # and it compresses
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, src.with_suffix(".json")):  # readable like any file the user writes
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask
    corpus_ = TextCorpus(out, block_size=16)
    assert corpus_.vocab_size == tok.vocab_size and isinstance(corpus_.tokenizer, BPETokenizer)


@pytest.mark.parametrize("chunk_bytes,piece_chars", [(1000, 100), (37, 5), (4096, 1)])
def test_chunked_encoding_equals_whole_text(corpus, chunk_bytes, piece_chars):
    text, src, out = corpus
    tok = tokenizer_from_dict(json.loads(src.with_suffix(".json").read_text())["tokenizer"])
    seen = []
    pieces = [p for c in text_chunks(str(src), chunk_bytes=chunk_bytes, on_bytes=seen.append)
              for p in _split_lines(c, piece_chars)]
    assert "".join(pieces) == text and sum(seen) == len(text.encode("utf-8"))
    assert len(pieces) > 20
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_text_chunks_reports_bad_utf8_past_the_first_mib(tmp_path):
    p = tmp_path / "late.txt"
    p.write_bytes(b"good line\n" * 300 + b"bad \xff byte\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(bad byte near offset 3004\)"):
        list(text_chunks(str(p), chunk_bytes=512))


def test_tokenize_errors_and_nothing_half_written(tmp_path, corpus):
    text, src, out = corpus
    with pytest.raises(DataError, match="at least 257 tokens"):
        tokenize_file(str(src), out=str(tmp_path / "a.bin"), vocab_size=100, progress=False)
    with pytest.raises(DataError, match="exists; remove it or pass overwrite=True"):
        tokenize_file(str(src), vocab_size=300, progress=False)
    with pytest.raises(DataError, match="already a token file"):
        tokenize_file(out, progress=False)
    with pytest.raises(DataError, match="must end in .bin"):
        tokenize_file(str(src), out=str(tmp_path / "x.tok"), progress=False)

    class Failing:  # a tokenizer that dies partway through the file
        vocab_size, calls = 300, 0

        def encode(self, t):
            Failing.calls += 1
            if Failing.calls > 3:
                raise RuntimeError("boom")
            return [1, 2, 3]

        def to_dict(self):
            return {"type": "byte"}

    big = tmp_path / "big.txt"
    big.write_text("abc def\n" * 50000)
    with pytest.raises(RuntimeError, match="boom"):
        tokenize_file(str(big), tokenizer=Failing(), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["big.txt"]  # no token file, sidecar or temp file left


def test_cli_tokenize_train_generate(tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text(_text(800, seed=1), encoding="utf-8")
    assert main(["tokenize", str(src), "--vocab-size", "300", "--no-progress"]) == 0
    said = capsys.readouterr().out
    vocab = json.loads((tmp_path / "t.json").read_text())["vocab_size"]
    assert f"--data {tmp_path / 't.bin'} --preset small --vocab-size {vocab}" in said
    run = str(tmp_path / "run")
    common = ["--data", str(tmp_path / "t.bin"), "--preset", "small", "--steps", "2", "--batch-size", "2",
              "--eval-every", "2", "--no-progress", "--backend", "torch"]
    # the preset's 256-token vocabulary is too small for this data: say how to fix it
    assert main(["train", *common, "--out", run]) == 2
    assert f"--vocab-size {vocab}" in capsys.readouterr().err
    assert main(["train", *common, "--out", run, "--vocab-size", str(vocab)]) == 0
    assert "sample:" in capsys.readouterr().err
    assert main(["generate", run, "--prompt", "the quick", "--max-new-tokens", "5", "--seed", "0",
                 "--backend", "torch"]) == 0
    assert capsys.readouterr().out.startswith("the quick")


def test_tokenize_checks_the_whole_file_before_any_work(tmp_path):
    src = tmp_path / "late.txt"
    good = b"some text here\n" * 100_000  # 1.5 MB: the bad byte lies past the first MiB
    src.write_bytes(good + b"caf\xe9\n" + good)
    calls = []

    class Recording:
        vocab_size = 300

        def encode(self, t):
            calls.append(t)
            return [1]

        def to_dict(self):
            return {"type": "byte"}

    for tok in (None, Recording()):  # training the tokenizer, or encoding with a given one
        with pytest.raises(DataError, match=rf"not UTF-8 text \(bad byte at offset {len(good) + 3}\)"):
            tokenize_file(str(src), tokenizer=tok, vocab_size=300, progress=False)
    assert calls == [] and sorted(os.listdir(tmp_path)) == ["late.txt"]


def test_tokenize_missing_input_has_no_data_hint(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist$"):
        tokenize_file(str(tmp_path / "nope.txt"), progress=False)
    with pytest.raises(DataError, match="is a directory; give a UTF-8 text file$"):
        tokenize_file(str(tmp_path), progress=False)
    assert main(["tokenize", str(tmp_path / "nope.txt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--data" not in err


def test_truncated_token_file_is_reported(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(_text(300, seed=2), encoding="utf-8")
    out = tokenize_file(str(src), vocab_size=300, progress=False)
    data = open(out, "rb").read()
    TextCorpus(out, block_size=8)  # whole: fine
    with open(out, "wb") as f:
        f.write(data[:-2])  # one uint16 token short, as a copy cut off would be
    with pytest.raises(DataError, match="holds .* tokens but its sidecar .* says .*truncated"):
        TextCorpus(out, block_size=8)


def test_any_seam_cuts_like_the_whole_text():
    # Cut at every seam at once (_split_lines with 1-character pieces): random strings over
    # letters, digits, CJK, emoji, apostrophes and whitespace of every kind, including the
    # separators \x1c-\x1f that Python calls whitespace and the tokenizer does not.
    rng = random.Random(3)
    alphabet = list("ab xZ'\n\r\t.,!12") + ["\u00a0", "\u3000", "\u2028", "\u2009", "\u200b", "\u180e",
                                           "\x0b", "\x0c", "\x1c", "\x1d", "\x1f", "\x85",
                                           "你", "好", "。", "🙂", "é", "'s", "'t"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    tok = BPETokenizer.train(texts, 320, progress=False)
    cut = 0
    for t in texts:
        pieces = _split_lines(t, 1)
        assert "".join(pieces) == t
        cut += len(pieces) - 1
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(t), repr(t)
    assert cut > 5000  # seams are everywhere in such text


def test_crlf_data_without_spaces_still_has_seams(tmp_path):
    # a CSV with Windows line ends and no spaces: "\r" after a digit is where it may be cut
    rng = random.Random(4)
    text = "".join(",".join(str(rng.randint(0, 999)) for _ in range(6)) + "\r\n" for _ in range(400))
    src = tmp_path / "t.csv"
    src.write_bytes(text.encode())
    pieces = [p for c in text_chunks(str(src), chunk_bytes=256) for p in _split_lines(c, 64)]
    assert "".join(pieces) == text and len(pieces) > 100
    assert all(p.startswith("\r") for p in pieces[1:])  # every cut at a seam, none forced
    tok = BPETokenizer.train([text], 300, progress=False)
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)
