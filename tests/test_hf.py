"""GPT-2 weights in and out (barkgpt.load_hf / barkgpt.save_hf) against Hugging Face transformers:
small random GPT-2 models built here, no network."""

import json
import os
import pickle

import pytest
import torch

from hf_helpers import import_transformers, repo_kernels_imported_twice  # noqa: E402

transformers = import_transformers()

import barkgpt  # noqa: E402
from barkgpt import BarkGPT, GPTConfig, HFFormatError, load_hf, save_hf, ops  # noqa: E402
from barkgpt.data import BPETokenizer  # noqa: E402


TEXTS = ["Hello world! The quick brown fox jumps over the lazy dog.",
         "  spaces   and\ttabs\nnew lines\r\n", "naïve café — 日本語 😀 <|endoftext|> end", ""]


def hf_model(seed=0, **kw):
    """A random GPT2LMHeadModel: every parameter (LayerNorms included) drawn at random, so that a
    swapped, untransposed or misplaced tensor changes the logits."""
    cfg = dict(vocab_size=61, n_positions=16, n_embd=12, n_layer=2, n_head=3, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def bpe_tokenizer(vocab_size=290):
    return BPETokenizer.train(TEXTS * 20 + ["the the the fox fox dog dog"] * 20, vocab_size, min_frequency=1,
                              progress=False)


def hf_logits(m, idx):
    with torch.no_grad():
        return m(idx).logits


def backends():
    out = []
    for b in ("torch", "cpp", "triton"):
        reason = ops.unavailable_reason(b, "cpu")
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)) if reason else b)
    return out


@pytest.fixture
def gpt2_dir(tmp_path):
    m = hf_model()
    d = tmp_path / "gpt2"
    m.save_pretrained(d)
    return m, str(d)


@pytest.fixture
def gpt2_tok_dir(tmp_path):
    """A GPT-2 with a vocabulary large enough for a byte-level BPE tokenizer (at least 257)."""
    m = hf_model(vocab_size=300)
    d = tmp_path / "gpt2"
    m.save_pretrained(d)
    return m, str(d)


# ---- import ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False, "activation_function": "relu", "n_inner": 20},
                                {"activation_function": "gelu", "layer_norm_epsilon": 1e-3, "n_head": 4}])
def test_imported_logits_equal_transformers(tmp_path, backend, kw):
    ref = hf_model(**kw)
    ref.save_pretrained(tmp_path)
    m = load_hf(str(tmp_path), backend=backend).eval()
    assert m.config.tie_embeddings == kw.get("tie_word_embeddings", True)
    idx = torch.randint(0, 61, (2, 16))
    if backend == "triton":
        idx = idx[:1, :7]  # the interpreter is slow
    with torch.no_grad():
        got = m(idx)
    torch.testing.assert_close(got, hf_logits(ref, idx), atol=1e-5, rtol=1e-5)


def test_config_mapping(gpt2_dir):
    _, d = gpt2_dir
    c = load_hf(d).config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (61, 16, 2, 3, 12)
    assert c.norm_first and c.causal and c.bias and c.tie_embeddings and c.activation == "gelu_tanh"
    assert c.ffn_hidden is None and c.dropout == 0.0
    assert load_hf(d, dropout=0.1).config.dropout == 0.1


def test_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The original Hub checkpoints name tensors without ``transformer.`` and carry the causal mask
    buffers (attn.bias, attn.masked_bias): both load."""
    from safetensors.torch import save_file

    ref = hf_model()
    ref.config.to_json_file(str(tmp_path / "config.json"))
    sd = {k[len("transformer."):]: v.contiguous() for k, v in ref.state_dict().items() if k.startswith("transformer.")}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(str(tmp_path), backend="torch")(idx), hf_logits(ref, idx),
                                   atol=1e-5, rtol=1e-5)


def test_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    ref = hf_model()
    ref.config.to_json_file(str(tmp_path / "config.json"))
    items = sorted((k, v.contiguous()) for k, v in ref.state_dict().items() if k != "lm_head.weight")
    halves = [dict(items[:10]), dict(items[10:])]
    weight_map = {}
    for n, part in enumerate(halves):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file(part, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    idx = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(str(tmp_path), backend="torch")(idx), hf_logits(ref, idx),
                                   atol=1e-5, rtol=1e-5)


class _Boom:
    """Unpickling this creates a marker file: proof that a loader unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_and_never_unpickled(tmp_path):
    hf_model().config.to_json_file(str(tmp_path / "config.json"))
    marker = tmp_path / "unpickled"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    with pytest.raises(HFFormatError) as e:
        load_hf(str(tmp_path))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "save_pretrained" in msg and "safetensors" in msg
    assert not marker.exists()


def _rewrite(d, edit_tensors=None, edit_config=None):
    from safetensors.torch import load_file, save_file

    path = os.path.join(d, "model.safetensors")
    if edit_tensors:
        sd = load_file(path)
        edit_tensors(sd)
        save_file(sd, path, metadata={"format": "pt"})
    if edit_config:
        cpath = os.path.join(d, "config.json")
        cfg = json.load(open(cpath))
        edit_config(cfg)
        json.dump(cfg, open(cpath, "w"))


@pytest.mark.parametrize("edit_tensors, edit_config, msg", [
    (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"), None, "missing h.1.mlp.c_fc.bias"),
    (lambda sd: sd.__setitem__("transformer.h.2.ln_1.weight", torch.ones(12)), None, "unexpected h.2.ln_1.weight"),
    (None, lambda c: c.__setitem__("n_inner", 40), "mlp.c_fc.weight (12, 48) (config.json implies (12, 40))"),
    (None, lambda c: c.__setitem__("n_positions", 32), "wpe.weight (16, 12) (config.json implies (32, 12))"),
    (None, lambda c: c.__setitem__("tie_word_embeddings", False), "missing lm_head.weight"),
    (lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(61, 12)), None, "lm_head.weight differs"),
    (None, lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]), "'llama' model"),
    (None, lambda c: c.__setitem__("activation_function", "silu"), "activation_function 'silu'"),
    (None, lambda c: c.__setitem__("scale_attn_by_inverse_layer_idx", True), "scale_attn_by_inverse_layer_idx"),
    (None, lambda c: c.__setitem__("n_head", 5), "n_embd (12) must be divisible by n_head (5)"),
])
def test_mismatches_are_one_clear_error(gpt2_dir, edit_tensors, edit_config, msg):
    _, d = gpt2_dir
    _rewrite(d, edit_tensors, edit_config)
    with pytest.raises(HFFormatError) as e:
        load_hf(d)
    assert msg in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(HFFormatError, match="is not a directory"):
        load_hf(str(tmp_path / "nope"))
    with pytest.raises(HFFormatError, match="has no config.json"):
        load_hf(str(tmp_path))
    hf_model().config.to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(HFFormatError, match="has no model.safetensors"):
        load_hf(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(HFFormatError, match="not a readable safetensors"):
        load_hf(str(tmp_path))


# ---- export ------------------------------------------------------------------------------------

def _random_barkgpt(**kw):
    c = dict(vocab_size=61, block_size=16, n_layer=2, n_head=3, n_embd=12, activation="gelu_tanh",
             tie_embeddings=True)
    c.update(kw)
    torch.manual_seed(1)
    m = BarkGPT(GPTConfig(**c), backend="torch").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False, "activation": "relu", "ffn_hidden": 20},
                                {"activation": "gelu", "layer_norm_eps": 1e-3, "dropout": 0.1}])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, kw):
    m = _random_barkgpt(**kw)
    out = save_hf(m, str(tmp_path / "out"))
    ref = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(ref, idx), m(idx), atol=1e-5, rtol=1e-5)
    # ... and back: every weight bitwise equal, the same config
    back = load_hf(out, dropout=m.config.dropout)
    assert back.config == m.config
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hf_to_barkgpt_to_hf_is_bitwise(gpt2_dir, tmp_path):
    from safetensors.torch import load_file

    _, d = gpt2_dir
    out = save_hf(load_hf(d), str(tmp_path / "again"))
    src, dst = load_file(os.path.join(d, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert src.keys() == dst.keys()
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k


@pytest.mark.parametrize("kw, why", [({"norm_first": False}, "norm_first=False (post-LN"),
                                     ({"bias": False}, "bias=False"),
                                     ({"causal": False}, "causal=False")])
def test_export_of_configs_gpt2_cannot_express(tmp_path, kw, why):
    m = _random_barkgpt(**kw)
    with pytest.raises(HFFormatError, match="cannot be written as GPT-2") as e:
        save_hf(m, str(tmp_path / "out"))
    assert why in str(e.value)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    m = _random_barkgpt()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(HFFormatError, match="not empty"):
        save_hf(m, str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_hf(m, str(tmp_path / "out"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp dirs left
    # never over a barkgpt model or run, even with overwrite
    m.save(str(tmp_path / "run"))
    with pytest.raises(HFFormatError, match="holds a barkgpt model or training run"):
        save_hf(m, str(tmp_path / "run"), overwrite=True)
    assert os.path.exists(tmp_path / "run" / "manifest.json")


# ---- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_json_round_trips_and_matches_transformers(gpt2_tok_dir):
    _, d = gpt2_tok_dir
    tok = bpe_tokenizer()
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(tok._tk.to_str())
    m = load_hf(d)
    assert m.tokenizer is not None and m.tokenizer.eos_id == tok.eos_id
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    for text in TEXTS:
        ids = m.tokenizer.encode(text)
        assert m.tokenizer.decode(ids) == text
        assert ids == fast.encode(text)


def test_vocab_and_merges_tokenizer_matches_gpt2tokenizer(gpt2_tok_dir):
    """The files of the slow GPT2Tokenizer (vocab.json + merges.txt) give the same ids as it."""
    _, d = gpt2_tok_dir
    tok = bpe_tokenizer()
    tok._tk.model.save(d)  # vocab.json + merges.txt
    m = load_hf(d)
    slow = transformers.GPT2Tokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    for text in TEXTS:
        ids = m.tokenizer.encode(text)
        assert m.tokenizer.decode(ids) == text
        assert ids == slow.encode(text), text
    assert m.tokenizer.eos_id == slow.convert_tokens_to_ids("<|endoftext|>")


def test_tokenizer_exported_and_generate_speaks_text_like_transformers(gpt2_tok_dir, tmp_path):
    _, d = gpt2_tok_dir
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(bpe_tokenizer()._tk.to_str())
    m = load_hf(d, backend="torch")
    out = save_hf(m, str(tmp_path / "out"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "the quick fox"
    ids = m.tokenizer.encode(prompt)
    assert auto.encode(prompt) == ids
    ref = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert ref.config.eos_token_id == m.tokenizer.eos_id
    idx = torch.tensor([ids])
    mine = m.generate(idx, 8, greedy=True)
    with torch.no_grad():
        theirs = ref.generate(idx, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              attention_mask=torch.ones_like(idx), pad_token_id=0)
    assert mine.tolist() == theirs.tolist()
    assert isinstance(m.tokenizer.decode(mine[0].tolist()), str)


def test_public_api():
    assert barkgpt.load_hf is load_hf and barkgpt.save_hf is save_hf
    assert issubclass(HFFormatError, barkgpt.CheckpointError)


def test_tokenize_with_the_tokenizer_of_a_gpt2_directory(gpt2_tok_dir, tmp_path):
    from barkgpt.cli import main
    from barkgpt.data import TextCorpus
    from barkgpt.hf import same_tokenizer, tokenizer_from_path

    _, d = gpt2_tok_dir
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(bpe_tokenizer()._tk.to_str())
    text = "".join(TEXTS) * 40
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    assert main(["tokenize", str(tmp_path / "corpus.txt"), "--tokenizer", d, "--no-progress"]) == 0
    corpus = TextCorpus(str(tmp_path / "corpus.bin"), block_size=8)
    tok = load_hf(d).tokenizer
    assert same_tokenizer(corpus.tokenizer, tok) and not same_tokenizer(corpus.tokenizer, bpe_tokenizer(270))
    assert [int(i) for i in corpus.data] == tok.encode(text)
    # a barkgpt model directory lends its tokenizer the same way
    save_dir = str(tmp_path / "saved")
    load_hf(d).save(save_dir)
    assert same_tokenizer(tokenizer_from_path(save_dir), tok)
    with pytest.raises(HFFormatError, match="holds no tokenizer"):
        tokenizer_from_path(str(tmp_path))


def test_readme_gpt2_example_runs(gpt2_tok_dir, tmp_path, capsys, monkeypatch):
    import re

    _, d = gpt2_tok_dir
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(bpe_tokenizer()._tk.to_str())
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = re.search(r"## GPT-2 weights \(Hugging Face format\)\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert 'load_hf("gpt2")' in block and 'save_hf(model, "gpt2-copy")' in block
    assert d == str(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own README
    assert capsys.readouterr().out.startswith("Hello, my dog")
    assert transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2-copy")) is not None


@pytest.mark.parametrize("kind", ["bpe", "byte", "bark"])
def test_every_tokenizer_kind_is_exported_and_comes_back(tmp_path, kind):
    from barkgpt.data import BarkTokenizer, ByteTokenizer

    tok = {"bpe": bpe_tokenizer, "byte": ByteTokenizer, "bark": BarkTokenizer}[kind]()
    texts = ["User: speak Assistant: woof arf <EOS>", "speak  woof\ngrrr"] if kind == "bark" else TEXTS
    m = _random_barkgpt(vocab_size=300)
    m.tokenizer = tok
    out = save_hf(m, str(tmp_path / "out"))
    back = load_hf(out).tokenizer
    assert back.kind == kind and back.eos_id == tok.eos_id and back.pad_id == tok.pad_id
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for text in texts:
        ids = tok.encode(text)
        assert back.encode(text) == ids and back.decode(ids) == tok.decode(ids)
        assert auto.encode(text) == ids, text
    cfg = transformers.GPT2Config.from_pretrained(out)
    assert cfg.eos_token_id == tok.eos_id and getattr(cfg, "pad_token_id", None) == tok.pad_id


def test_half_precision_weights_load_as_float32(tmp_path):
    ref = hf_model().half()
    ref.save_pretrained(tmp_path)
    m = load_hf(str(tmp_path), backend="torch")
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in m.parameters())
    assert m.head.weight is m.token_emb.weight  # still tied after loading
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf_logits(ref.float(), idx), atol=1e-5, rtol=1e-5)


def test_transformers_did_not_import_the_kernels_folder_again():
    transformers.GPT2LMHeadModel  # noqa: B018 - the lazy import that probes for a `kernels` package
    assert not repo_kernels_imported_twice()
