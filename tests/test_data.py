import math

import pytest
import torch

from barkgpt.data import BarkCorpus, BarkTokenizer, ByteTokenizer, DataError, TextCorpus


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
