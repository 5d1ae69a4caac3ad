import json
import os

import pytest
import torch

import barkgpt
from barkgpt import BarkGPT, CheckpointError, GPTConfig
from barkgpt.checkpoint import MODEL_FILE, strip_prefixes
from barkgpt.data import BarkTokenizer


def make_model(**kw):
    cfg = dict(vocab_size=9, block_size=16, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    m = BarkGPT(GPTConfig(**cfg), backend="torch")
    m.tokenizer = BarkTokenizer()
    return m


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_identical_logits(tmp_path, tie):
    m = make_model(tie_embeddings=tie, norm_first=False, activation="relu").eval()
    idx = torch.randint(0, 9, (2, 16))
    m.save(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "manifest.json", "model.safetensors",
                                                    "tokenizer.json"]
    m2 = barkgpt.load(str(tmp_path / "m"), backend="torch").eval()
    assert m2.config == m.config
    assert torch.equal(m2(idx), m(idx))
    assert isinstance(m2.tokenizer, BarkTokenizer)
    if tie:
        assert m2.head.weight is m2.token_emb.weight


def test_weights_are_safetensors_not_pickle(tmp_path):
    make_model().save(str(tmp_path))
    with open(tmp_path / MODEL_FILE, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    assert "token_emb.weight" in header


def test_truncated_and_corrupted_files_are_named(tmp_path):
    make_model().save(str(tmp_path))
    p = tmp_path / MODEL_FILE
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        barkgpt.load(str(tmp_path))
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    p.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        barkgpt.load(str(tmp_path))


def test_not_a_barkgpt_dir(tmp_path):
    with pytest.raises(CheckpointError, match="holds no barkgpt model"):
        barkgpt.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="is not a directory"):
        barkgpt.load(str(tmp_path / "missing"))


def test_weights_from_another_config_rejected(tmp_path):
    make_model().save(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    man = json.loads((tmp_path / "manifest.json").read_text())
    import hashlib
    man["sha256"]["config.json"] = hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="do not fit the saved config"):
        barkgpt.load(str(tmp_path))


def test_strip_prefixes():
    assert strip_prefixes({"_orig_mod.module.a": 1, "module._orig_mod.b": 2, "c": 3}) == {"a": 1, "b": 2, "c": 3}


def test_compiled_model_state_dict_loads():
    m = make_model()
    sd = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    m2 = make_model()
    m2.load_weights(sd)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
