"""`barkgpt train --init-from DIR`: fine-tuning from a Hugging Face GPT-2 directory (a small random
one built here, no network), keeping its config and tokenizer; --resume afterwards."""

import os

import pytest
import torch

from hf_helpers import import_transformers  # noqa: E402

transformers = import_transformers()

import barkgpt  # noqa: E402
from barkgpt.cli import main  # noqa: E402
from barkgpt.data import BPETokenizer  # noqa: E402
from barkgpt.hf import same_tokenizer  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. a dog barks at the fox; the fox runs away.\n"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 with a BPE tokenizer, and a corpus tokenized with that tokenizer."""
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    tok = BPETokenizer.train([TEXT] * 50, 300, min_frequency=1, progress=False)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=320, n_positions=16, n_embd=16,
                                                              n_layer=2, n_head=2))
    d = root / "gpt2"
    hf.save_pretrained(d)
    (d / "tokenizer.json").write_text(tok._tk.to_str())
    (root / "corpus.txt").write_text(TEXT * 40)
    assert main(["tokenize", str(root / "corpus.txt"), "--tokenizer", str(d), "--no-progress"]) == 0
    return str(d), str(root / "corpus.bin"), root


def _train(**kw):
    base = dict(steps=4, batch_size=4, eval_every=2, save_every=2, lr=1e-3, progress=False, sample=False,
                backend="torch", log=lambda m: None)
    base.update(kw)
    return barkgpt.train(**base)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_init_from_keeps_config_weights_and_tokenizer(gpt2, tmp_path):
    d, data, _ = gpt2
    init = barkgpt.load_hf(d)
    r = _train(init_from=d, data=data, out=str(tmp_path / "run"), steps=1, lr=1e-9, warmup_steps=0)
    assert r.model.config == init.config
    assert same_tokenizer(r.model.tokenizer, init.tokenizer)
    # one step at lr 1e-9 moves no weight measurably: training started from the GPT-2 weights
    for k, v in _weights(init).items():
        torch.testing.assert_close(r.model.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    saved = barkgpt.load(str(tmp_path / "run"))
    assert saved.config == init.config and same_tokenizer(saved.tokenizer, init.tokenizer)


def test_init_from_then_resume_continues_exactly(gpt2, tmp_path):
    d, data, _ = gpt2
    whole = _train(init_from=d, data=data, out=str(tmp_path / "whole"))


    def crash(step, loss):
        if step == 2:  # just after the step-2 checkpoint
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _train(init_from=d, data=data, out=str(tmp_path / "split"), on_step=crash)
    resumed = _train(resume=True, out=str(tmp_path / "split"))
    assert resumed.losses == whole.losses
    for k, v in _weights(whole.model).items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_init_from_errors(gpt2, tmp_path):
    d, data, root = gpt2
    with pytest.raises(barkgpt.TrainingError, match=r"not tokenized with the tokenizer of .*barkgpt tokenize"):
        _train(init_from=d, data="bark", out=str(tmp_path / "a"))
    with pytest.raises(barkgpt.TrainingError, match=r"not tokenized with the tokenizer of"):
        _train(init_from=d, data=str(root / "corpus.txt"), out=str(tmp_path / "b"))  # bytes
    with pytest.raises(barkgpt.TrainingError, match="init_from takes the model's config from"):
        _train(init_from=d, data=data, model=dict(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16),
               out=str(tmp_path / "c"))
    with pytest.raises(barkgpt.TrainingError, match="init_from takes the model's config from"):
        _train(init_from=d, data=data, vocab_size=400, out=str(tmp_path / "d"))
    with pytest.raises(barkgpt.CheckpointError, match="is not a directory"):
        _train(init_from=str(tmp_path / "missing"), data=data, out=str(tmp_path / "e"))
    assert not any((tmp_path / n).exists() for n in "abcde")  # no run directory left by a failed start


def test_cli_init_from_and_resume(gpt2, tmp_path, capsys):
    d, data, _ = gpt2
    out = str(tmp_path / "run")
    common = ["--backend", "torch", "--no-progress", "--batch-size", "4", "--eval-every", "2"]
    assert main(["train", "--init-from", d, "--data", data, "--steps", "2", "--out", out, *common]) == 0
    assert main(["train", "--out", out, "--resume", "--steps", "4", *common]) == 0  # train on for 2 more
    assert "resuming" in capsys.readouterr().err
    m = barkgpt.load(out)
    assert m.config == barkgpt.load_hf(d).config
    # the fine-tuned model goes back out as GPT-2
    assert main(["export", out, str(tmp_path / "hf")]) == 0
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, m.eval()(idx), atol=1e-5, rtol=1e-5)


def test_cli_init_from_refuses_a_preset(gpt2, tmp_path, capsys):
    d, data, _ = gpt2
    assert main(["train", "--init-from", d, "--preset", "small", "--data", data, "--out", str(tmp_path / "r")]) == 2
    assert "--preset does not apply with --init-from" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
