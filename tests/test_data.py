import json
import math
import re

import numpy as np
import pytest
import torch

from barkgpt.data import BarkCorpus, BarkTokenizer, ByteTokenizer, DataError, TextCorpus, _check_text, load_dataset


def test_bark_vocab_order():
    assert BarkTokenizer.VOCAB == ("<PAD>", "<EOS>", "woof", "arf", "ruff", "grrr", "User:", "Assistant:", "speak")


def test_bark_decode_shows_ids_outside_the_vocabulary():
    # a model with vocab_size > 9 trained on the bark corpus can sample any of its ids
    tok = BarkTokenizer()
    assert tok.decode([6, 8, 7, 2, 12, 1, 0, 0, 9, -1]) == "User: speak Assistant: woof <unk:12> <EOS> <unk:9> <unk:-1>"
    assert tok.decode(torch.tensor([3, 63, 0])) == "arf <unk:63>"
    assert tok.decode([]) == ""


def test_bark_sequences_follow_the_grammar():
    c = BarkCorpus(block_size=32)
    seq = c.sample(500, torch.Generator().manual_seed(3))
    assert seq.shape == (500, 33)
    counts = []
    for row in seq.tolist():
        assert row[:3] == [6, 8, 7]
        eos = row.index(1)
        barks = row[3:eos]
        assert 2 <= len(barks) <= 10 and all(2 <= b <= 5 for b in barks)
        assert all(t == 0 for t in row[eos + 1:])
        counts.append(len(barks))
    assert set(counts) == set(range(2, 11))


def test_optimal_loss_by_hand():
    c = BarkCorpus()
    # Expected sum of -log p over a sequence, by the chain rule: every bark costs log 4, and the
    # stop decision after k >= 2 barks costs H(1/(11-k)) weighted by P(n >= k) = (11-k)/9.
    tot = 0.0
    for n in range(2, 11):
        nll = n * math.log(4)
        for k in range(2, n):
            nll += -math.log(1 - 1 / (11 - k))
        nll += -math.log(1 / (11 - n)) if n < 10 else 0.0
        tot += nll / 9
    want = tot / (6 + 3)  # E[targets] = E[n] + 3 = 9
    assert c.optimal_loss() == pytest.approx(want, rel=1e-12)
    # on a concrete set: close to the expectation for a large sample
    assert c.optimal_loss(c.sample(20000, torch.Generator().manual_seed(0))) == pytest.approx(want, rel=0.01)
    assert c.unigram_loss() > want + 0.5


def test_text_corpus_windows(tmp_path):
    p = tmp_path / "t.txt"
    text = "hello world, " * 200
    p.write_text(text)
    c = TextCorpus(str(p), block_size=16)
    x, y = c.get_batch(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    raw = text.encode()
    for row in x.tolist():
        assert bytes(row) in raw
    assert c.vocab_size == 256 and ByteTokenizer().decode(ByteTokenizer().encode("héllo")) == "héllo"
    assert sum(b[0].shape[0] for b in c.eval_batches(64)) > 0


@pytest.mark.parametrize("content, msg", [
    (b"", "is empty"),
    (b"abc\x00def" * 100, "looks binary"),
    (b"\xff\xfe bad" * 100, "is not UTF-8 text"),
    (b"tiny", "too few for block_size"),
])
def test_text_corpus_bad_files(tmp_path, content, msg):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=msg):
        TextCorpus(str(p), block_size=16)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TextCorpus(str(tmp_path / "nope.txt"), block_size=8)


def test_token_bin_file(tmp_path):
    import json

    import numpy as np

    ids = (np.arange(5000) % 300).astype(np.uint16)
    ids.tofile(tmp_path / "tok.bin")
    (tmp_path / "tok.json").write_text(json.dumps({"vocab_size": 300, "dtype": "uint16"}))
    c = TextCorpus(str(tmp_path / "tok.bin"), block_size=8)
    x, y = c.get_batch(3, torch.Generator().manual_seed(0))
    assert c.vocab_size == 300 and torch.equal((x + 1) % 300, y)


def test_rank_rows_are_slices_of_the_global_batch(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("".join(chr(97 + i % 26) for i in range(3000)))
    for corpus in (TextCorpus(str(p), block_size=8), BarkCorpus()):
        gx, gy = corpus.get_batch(6, torch.Generator().manual_seed(5))
        for r in range(3):
            g = torch.Generator().manual_seed(5)
            x, y = corpus.get_batch(6, g, rows=slice(2 * r, 2 * r + 2))
            assert torch.equal(x, gx[2 * r:2 * r + 2]) and torch.equal(y, gy[2 * r:2 * r + 2])
            assert torch.equal(g.get_state(), _advanced(corpus))


def _advanced(corpus):
    g = torch.Generator().manual_seed(5)
    corpus.get_batch(6, g)
    return g.get_state()


def _token_file(tmp_path, ids, meta, name="tok"):
    np.asarray(ids).tofile(tmp_path / f"{name}.bin")
    side = tmp_path / f"{name}.json"
    side.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return str(tmp_path / f"{name}.bin"), str(side)


@pytest.mark.parametrize("meta, msg", [
    ({"dtype": "uint16"}, "no vocab_size"),
    ({"vocab_size": "abc"}, "vocab_size must be a positive integer, got 'abc'"),
    ({"vocab_size": "300"}, "vocab_size must be a positive integer, got '300'"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"vocab_size": 30.5}, "vocab_size must be a positive integer"),
    ({"vocab_size": True}, "vocab_size must be a positive integer"),
    ({"vocab_size": 300, "dtype": "float32"}, "dtype must be an integer type such as uint16 or uint32, got 'float32'"),
    ({"vocab_size": 300, "dtype": "bool"}, "dtype must be an integer type"),
    ({"vocab_size": 300, "dtype": "nonsense"}, "dtype must be an integer type"),
    ({"vocab_size": 300, "dtype": 16}, "dtype must be an integer type"),
    ('{"vocab_size": 300,', "not valid JSON"),
    ("[300]", "not a JSON object"),
    ({"vocab_size": 300, "tokenizer": {"type": "zzz"}}, "unknown tokenizer description"),
])
def test_bad_sidecar_names_the_file_and_the_fix(tmp_path, meta, msg):
    path, side = _token_file(tmp_path, np.arange(400, dtype=np.uint16), meta)
    with pytest.raises(DataError, match=re.escape(msg)) as e:
        TextCorpus(path, block_size=8)
    assert repr(side) in str(e.value) and ('"vocab_size": N' in str(e.value) or "tokenizer" in msg)


def test_missing_sidecar(tmp_path):
    np.arange(400, dtype=np.uint16).tofile(tmp_path / "tok.bin")
    with pytest.raises(DataError, match=re.escape(f"needs a sidecar {str(tmp_path / 'tok.json')!r}")):
        TextCorpus(str(tmp_path / "tok.bin"), block_size=8)


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "uint8"])
def test_token_file_integer_dtypes(tmp_path, dtype):
    ids = (np.arange(1000) * 7 % 250).astype(dtype)
    path, _ = _token_file(tmp_path, ids, {"vocab_size": 250, "dtype": dtype})
    c = TextCorpus(path, block_size=8, val_fraction=0.0)
    x, y = next(c.eval_batches(1000))
    assert c.data.dtype == np.dtype(dtype) and x[0].tolist() == ids[:8].tolist()


def test_non_utf8_anywhere_in_the_file(tmp_path):
    p = tmp_path / "late.txt"
    good = b"some text\n" * 150_000  # 1.5 MB: the bad byte is past the first MiB (and block)
    p.write_bytes(good + b"bad \xff byte\n" + good)
    with pytest.raises(DataError, match=rf"not UTF-8 text \(bad byte at offset {len(good) + 4}\)"):
        TextCorpus(str(p), block_size=16)
    # a short file whose last character is cut off is not UTF-8 either
    p.write_bytes(b"hello world " * 10 + "\u20ac".encode()[:2])
    with pytest.raises(DataError, match=r"not UTF-8 text \(bad byte at offset 120\)"):
        TextCorpus(str(p), block_size=16)
    p.write_bytes(b"hello world " * 10 + "\u20ac".encode())
    assert TextCorpus(str(p), block_size=8).vocab_size == 256


@pytest.mark.parametrize("content, offset", [
    (b"ab\xe2\x82\xac\xff cd", 5),  # a bad byte right after a character that blocks may split
    (b"ab\xe2\x82X cd", 2),  # a character broken off: the offset is where it starts
    (b"ab\xe2\x82\xacz\xe2\x82", 6),  # cut off at the end of the file
])
def test_non_utf8_offset_is_exact_whatever_the_blocks(tmp_path, content, offset):
    p = tmp_path / "t.txt"
    p.write_bytes(content)
    for block_bytes in range(1, len(content) + 2):
        with pytest.raises(DataError, match=rf"bad byte at offset {offset}\)"):
            _check_text(str(p), block_bytes=block_bytes)


def test_nul_bytes_look_binary_past_a_valid_start(tmp_path):
    p = tmp_path / "b.txt"
    p.write_bytes(b"text\n" * 1000 + b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="looks binary"):
        TextCorpus(str(p), block_size=16)


def _positions(tmp_path, n, val_fraction, block_size, eval_windows=256):
    # token i of the file is i, so a window's tokens are its positions
    path, _ = _token_file(tmp_path, np.arange(n, dtype=np.uint16), {"vocab_size": n}, name=f"pos{n}")
    return TextCorpus(path, block_size=block_size, val_fraction=val_fraction, eval_windows=eval_windows)


def test_windows_reach_every_token_of_their_split_and_never_cross_it(tmp_path):
    T = 4
    c = _positions(tmp_path, 50, 0.2, T)
    assert c.split_at == 40
    x, y = c.get_batch(4000, torch.Generator().manual_seed(0))  # 36 starts: each drawn w.p. ~1 - e**-111
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert set(x[:, 0].tolist()) == set(range(40 - T))
    assert int(y.max()) == 39  # the last training token is a target; no validation token is
    assert set(y.flatten().tolist()) == set(range(1, 40))

    vx, vy = (torch.cat(t) for t in zip(*c.eval_batches(4)))
    assert vx[:, 0].tolist() == list(range(40, 50 - T))  # every validation window, once
    assert int(vx.min()) == 40 and int(vy.max()) == 49
    # fewer windows than there are: spread evenly, the first and the last included
    few = _positions(tmp_path, 50, 0.2, T, eval_windows=3)
    assert torch.cat([b[0] for b in few.eval_batches(2)])[:, 0].tolist() == [40, 42, 45]
    # no validation split: evaluation runs over the training windows, the last token included
    whole = _positions(tmp_path, 30, 0.0, T)
    wx, wy = (torch.cat(t) for t in zip(*whole.eval_batches(64)))
    assert wx[:, 0].tolist() == list(range(30 - T)) and int(wy.max()) == 29


def test_smallest_splits(tmp_path):
    # a split of block_size + 1 tokens holds exactly one window; block_size tokens none
    c = _positions(tmp_path, 10, 0.5, 4)
    assert c.get_batch(3, torch.Generator().manual_seed(0))[0][:, 0].tolist() == [0, 0, 0]
    assert [b[0][:, 0].tolist() for b in c.eval_batches(8)] == [[5]]
    with pytest.raises(DataError, match="too few for block_size 5"):
        _positions(tmp_path, 10, 0.5, 5)


def test_missing_file_hint_only_for_data(tmp_path):
    with pytest.raises(DataError, match=re.escape("does not exist (use --data bark for the built-in corpus)")):
        load_dataset(str(tmp_path / "nope.txt"), block_size=8)
    with pytest.raises(DataError, match="is a directory; give a .txt file or a .bin token file"):
        load_dataset(str(tmp_path), block_size=8)
