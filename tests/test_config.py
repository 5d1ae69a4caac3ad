import json

import pytest

from barkgpt import ConfigError, GPTConfig


def test_defaults_and_derived():
    c = GPTConfig(vocab_size=9, block_size=32, n_layer=2, n_head=8, n_embd=8)
    assert (c.dropout, c.bias, c.norm_first, c.activation, c.causal) == (0.0, True, True, "gelu", True)
    assert c.ffn_dim == 32 and c.head_dim == 1
    assert GPTConfig(vocab_size=9, block_size=4, n_layer=1, n_head=1, n_embd=4, ffn_hidden=7).ffn_dim == 7


@pytest.mark.parametrize("kw, msg", [
    (dict(n_embd=10, n_head=3), "divisible by n_head"),
    (dict(n_layer=0), "n_layer must be positive"),
    (dict(vocab_size=-1), "vocab_size must be positive"),
    (dict(block_size=2.5), "block_size must be an int"),
    (dict(n_head=True), "n_head must be an int"),
    (dict(activation="swish"), "activation must be one of"),
    (dict(dropout=1.0), "dropout must be a float in"),
    (dict(ffn_hidden=0), "ffn_hidden must be a positive int"),
    (dict(bias="yes"), "bias must be true or false"),
    (dict(layer_norm_eps=0), "layer_norm_eps must be a positive"),
])
def test_validation_messages(kw, msg):
    base = dict(vocab_size=9, block_size=32, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    with pytest.raises(ConfigError, match=msg):
        GPTConfig(**base)


def test_presets_required_by_the_article():
    names = GPTConfig.presets()
    for name in ("bark", "bark-tiny", "small", "gpt2"):
        assert name in names and names[name]
    tiny = GPTConfig.preset("bark-tiny")
    assert (tiny.vocab_size, tiny.n_embd, tiny.n_head, tiny.n_layer, tiny.block_size) == (9, 8, 8, 2, 32)
    bark = GPTConfig.preset("bark")
    assert (bark.vocab_size, bark.n_embd, bark.n_head, bark.n_layer) == (9, 32, 2, 2)
    small = GPTConfig.preset("small")
    assert (small.block_size, small.n_embd, small.n_head, small.n_layer) == (128, 128, 2, 4)
    g = GPTConfig.preset("gpt2")
    assert (g.vocab_size, g.n_layer, g.n_head, g.n_embd, g.block_size) == (50304, 12, 12, 768, 1024)
    assert GPTConfig.preset("bark", dropout=0.1).dropout == 0.1
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available presets: bark"):
        GPTConfig.preset("nope")


def test_json_round_trip(tmp_path):
    for name in GPTConfig.presets():
        c = GPTConfig.preset(name)
        assert GPTConfig.from_json(c.to_json()) == c
        p = tmp_path / f"{name}.json"
        c.to_json(str(p))
        assert GPTConfig.from_json(str(p)) == c


def test_json_errors(tmp_path):
    good = GPTConfig.preset("bark").to_dict()
    with pytest.raises(ConfigError, match=r"unknown GPTConfig field\(s\) \['n_heads'\]"):
        GPTConfig.from_dict({**good, "n_heads": 2})
    missing = dict(good)
    del missing["n_embd"]
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['n_embd'\]"):
        GPTConfig.from_dict(missing)
    with pytest.raises(ConfigError, match="not valid JSON"):
        GPTConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        GPTConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match="does not exist"):
        GPTConfig.from_json(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**good, "n_head": 3}))
    with pytest.raises(ConfigError, match="divisible"):
        GPTConfig.from_json(str(bad))
