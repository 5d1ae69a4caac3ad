"""Validation data: a separate validation file, the held-out share, the evaluation size, and the
bytes each token stands for (what turns a loss per token into bits per byte)."""

import json

import numpy as np
import pytest
import torch

from barkgpt.data import BarkCorpus, DataError, TextCorpus, load_dataset, token_byte_lengths, tokenize_file
from barkgpt.data import tokenizer_from_dict


def _text_file(path, n, seed=0):
    rng = np.random.default_rng(seed)
    path.write_bytes(bytes(rng.integers(97, 123, n, dtype=np.uint8)))
    return str(path)


def test_val_file_is_the_validation_set_and_all_of_data_trains(tmp_path):
    train = _text_file(tmp_path / "train.txt", 4000)
    val = tmp_path / "val.txt"
    val.write_bytes(b"0123456789" * 50)
    c = load_dataset(train, 16, val_data=str(val))
    assert c.split_at == 4000  # nothing of --data held out
    xs = torch.cat([x for x, _ in c.eval_batches(7)])
    assert set(xs.flatten().tolist()) <= set(b"0123456789")  # every evaluated window is from the file
    assert c.describe()["val_path"].endswith("val.txt")
    g = torch.Generator().manual_seed(0)
    x, _ = c.get_batch(64, g)
    assert not set(x.flatten().tolist()) & set(b"0123456789")


def test_val_fraction(tmp_path):
    train = _text_file(tmp_path / "train.txt", 4000)
    assert load_dataset(train, 16).split_at == 3600  # default: the last 10%
    assert load_dataset(train, 16, val_fraction=0.25).split_at == 3000
    c = load_dataset(train, 16, val_fraction=0.0)  # no held-out data: evaluates on the training data
    assert c.split_at == 4000 and not c.has_val
    for bad in (1.0, -0.1, 2):
        with pytest.raises(DataError, match=r"validation fraction must be a number in \[0, 1\)"):
            load_dataset(train, 16, val_fraction=bad)
    with pytest.raises(DataError, match="either a validation file or a validation fraction"):
        load_dataset(train, 16, val_data=train, val_fraction=0.1)
    with pytest.raises(DataError, match="bark corpus has its own held-out set"):
        load_dataset("bark", 32, val_fraction=0.2)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(train, 16, val_data=str(tmp_path / "missing.txt"))


def test_val_file_must_be_tokenized_like_the_data(tmp_path):
    train = _text_file(tmp_path / "train.txt", 4000)
    tokens = tmp_path / "tok.bin"
    np.arange(100, dtype=np.uint16).tofile(tokens)
    tokens.with_suffix(".json").write_text(json.dumps({"vocab_size": 100, "dtype": "uint16"}))
    with pytest.raises(DataError, match="not tokenized like the data"):
        load_dataset(train, 16, val_data=str(tokens))


@pytest.mark.parametrize("windows", [1, 5, 64, None, 10_000])
def test_eval_size(tmp_path, windows):
    c = TextCorpus(_text_file(tmp_path / "t.txt", 20_000), block_size=16)
    n = sum(x.shape[0] for x, _ in c.eval_batches(8, windows))
    assert n == c.eval_windows(windows) == {None: 256, 10_000: 2000 - 16}.get(windows, windows)
    bark = BarkCorpus()
    n = sum(x.shape[0] for x, _ in bark.eval_batches(100, windows))
    assert n == bark.eval_windows(windows) == min(windows or 2048, 2048)


def test_token_bytes_of_byte_and_bpe_tokens(tmp_path):
    c = TextCorpus(_text_file(tmp_path / "t.txt", 2000), block_size=16)
    assert c.token_bytes.tolist() == [1.0] * 256
    assert BarkCorpus().token_bytes is None
    pytest.importorskip("tokenizers")
    text = "".join(f"naïve café {i} 你好 🙂 the quick brown fox\n" for i in range(300))
    src = tmp_path / "c.txt"
    src.write_text(text, encoding="utf-8")
    out = tokenize_file(str(src), vocab_size=300, progress=False)
    tok = tokenizer_from_dict(json.loads(src.with_suffix(".json").read_text())["tokenizer"])
    lengths = token_byte_lengths(tok, tok.vocab_size)
    ids = np.fromfile(out, dtype=np.uint16).astype(np.int64)
    # the bytes of the tokens add up to the bytes of the text, exactly
    assert lengths[torch.from_numpy(ids)].sum().item() == len(text.encode("utf-8"))
    assert lengths[tok.eos_id].item() == 0
