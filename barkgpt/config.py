"""GPTConfig: the whole model is defined by these numbers (weights + config = model)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


class ConfigError(ValueError):
    """A GPTConfig (or its JSON) is invalid; the message says what to change."""


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    # Pre-LN (GPT-2) by default; the article's nn.TransformerEncoderLayer is post-LN.
    norm_first: bool = True
    # "relu" matches the article's nn.TransformerEncoderLayer default.
    activation: str = "gelu"
    # A GPT must not see future tokens; the article's model has no mask (causal=False).
    causal: bool = True
    # Feed-forward width; None means the GPT convention 4 * n_embd.
    ffn_hidden: Optional[int] = None
    # Share the token embedding with the output head (GPT-2 does; the article does not).
    tie_embeddings: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"GPTConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
            if v <= 0:
                raise ConfigError(f"GPTConfig.{name} must be positive, got {v}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head in {[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:8]}"
            )
        if self.ffn_hidden is not None:
            if isinstance(self.ffn_hidden, bool) or not isinstance(self.ffn_hidden, int) or self.ffn_hidden <= 0:
                raise ConfigError(f"GPTConfig.ffn_hidden must be a positive int or None, got {self.ffn_hidden!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"GPTConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) or not (self.layer_norm_eps > 0):
            raise ConfigError(f"GPTConfig.layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("bias", "norm_first", "causal", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")

    # ---- derived ----------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.n_embd

    # ---- presets ------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        kw = dict(PRESETS[name]["config"])
        kw.update(overrides)
        return cls(**kw)

    @staticmethod
    def presets() -> Dict[str, str]:
        """Preset name -> one-line description."""
        return {k: v["about"] for k, v in PRESETS.items()}

    # ---- serialization ------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GPTConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a GPTConfig must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(required - set(d))
        if missing:
            raise ConfigError(f"GPTConfig is missing required field(s) {missing}")
        return cls(**d)

    @classmethod
    def from_json_file(cls, path: str) -> "GPTConfig":
        """Load from a JSON file (any path, even one that starts with ``{``)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ConfigError(f"config file {path!r} is a directory; give a GPTConfig JSON file")
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path!r} is not UTF-8 text (bad byte at offset "
                              f"{e.start}); give a GPTConfig JSON file") from None
        return cls.from_json_text(text)

    @classmethod
    def from_json_text(cls, text: str) -> "GPTConfig":
        """Load from JSON text (never read as a path)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_json(cls, path_or_text: str) -> "GPTConfig":
        """Load from a JSON file path or a JSON string: a file that exists is always read as a
        file (so a directory named ``{runs}`` works); otherwise text starting with ``{`` is JSON.
        ``from_json_file`` / ``from_json_text`` say which explicitly."""
        path_or_text = os.fspath(path_or_text)
        if os.path.exists(path_or_text) or not path_or_text.lstrip().startswith("{"):
            return cls.from_json_file(path_or_text)
        try:
            return cls.from_json_text(path_or_text)
        except ConfigError as e:
            if "\n" not in path_or_text and os.sep in path_or_text:
                raise ConfigError(f"{e}; if {path_or_text!r} is meant as a file path, it does not exist") from None
            raise


BARK_VOCAB_SIZE = 9

PRESETS: Dict[str, Dict[str, Any]] = {
    "bark": {
        "about": "the article's BarkGPT sizes (n_embd=32, n_head=2, n_layer=2, 9-token bark vocabulary) "
                 "as a causal pre-LN GPT, block 32",
        "config": dict(vocab_size=BARK_VOCAB_SIZE, block_size=32, n_layer=2, n_head=2, n_embd=32),
    },
    "bark-tiny": {
        "about": "the article's GPTConfig example sizes: n_embd=8, n_head=8 (head dim 1), n_layer=2, "
                 "block_size=32, as a causal pre-LN GPT",
        "config": dict(vocab_size=BARK_VOCAB_SIZE, block_size=32, n_layer=2, n_head=8, n_embd=8),
    },
    "bark-article": {
        # The article's first model, except that its layers (no batch_first=True) attend across the
        # batch and its head has a bias: barkgpt attends within each sequence, bias-free head.
        "about": "the article's first model's layer design: post-LN, ReLU, ffn 128, no causal mask, "
                 "biases, block 256 (but attention within each sequence, no head bias)",
        "config": dict(vocab_size=BARK_VOCAB_SIZE, block_size=256, n_layer=2, n_head=2, n_embd=32,
                       norm_first=False, activation="relu", causal=False, ffn_hidden=128),
    },
    "small": {
        "about": "the article's smallest non-looping config: block 128, n_embd 128, n_head 2, n_layer 4",
        "config": dict(vocab_size=256, block_size=128, n_layer=4, n_head=2, n_embd=128),
    },
    "gpt2": {
        "about": "GPT-2 small (124M): 12 layers, 12 heads, 768 wide, block 1024, vocab padded to 50304, tied head",
        "config": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                       activation="gelu_tanh", tie_embeddings=True),
    },
}


# ---- training defaults ----------------------------------------------------------------------------
# What `barkgpt train` / barkgpt.train() use for each preset unless told otherwise, and
# `barkgpt presets` shows. Each was tried on this preset: a short run does not diverge
# (tests/test_presets_train.py). Warmup: 5% of the steps, at most warmup_max. eval_tokens:
# validation tokens per evaluation; None sizes it to the run (about 0.3 x eval_every x tokens per
# step, so forward-only evaluation costs about a tenth of the training between two evaluations),
# between one window and eval_tokens_max.
TRAIN_DEFAULTS: Dict[str, Dict[str, Any]] = {
    # the bark corpus's whole held-out set (2048 sequences): cheap for these models
    "bark": dict(lr=1e-2, batch_size=64, warmup_max=100, eval_tokens=2048 * 32),
    "bark-tiny": dict(lr=1e-2, batch_size=64, warmup_max=100, eval_tokens=2048 * 32),
    "bark-article": dict(lr=1e-2, batch_size=64, warmup_max=100, eval_tokens=2048 * 256),
    "small": dict(lr=3e-3, batch_size=32, warmup_max=100, eval_tokens=None, eval_tokens_max=256 * 128),
    # GPT-2 small's usual peak lr; batch 8 x 1024 tokens fits a 24 GB GPU (--grad-accum for more)
    "gpt2": dict(lr=6e-4, batch_size=8, warmup_max=700, eval_tokens=None, eval_tokens_max=128 * 1024),
}
EVAL_SHARE = 0.3  # eval tokens per training token between evaluations, for sized evaluations


def train_defaults(preset: Optional[str], config: "GPTConfig") -> Dict[str, Any]:
    """lr, batch_size, warmup_max, eval_tokens and eval_tokens_max for ``preset``; for a model
    of your own (``preset=None``), by size: the wider the model, the lower the learning rate."""
    if preset is not None and preset in TRAIN_DEFAULTS:
        return dict(TRAIN_DEFAULTS[preset], eval_tokens_max=TRAIN_DEFAULTS[preset].get("eval_tokens_max"))
    lr = 1e-2 if config.n_embd <= 64 else 3e-3 if config.n_embd <= 256 else 1e-3 if config.n_embd <= 512 else 6e-4
    batch = max(1, min(64, 16384 // config.block_size))
    return dict(lr=lr, batch_size=batch, warmup_max=100, eval_tokens=None, eval_tokens_max=256 * config.block_size)


def default_warmup(steps: int, warmup_max: int) -> int:
    return min(warmup_max, steps // 20)


def default_eval_tokens(defaults: Dict[str, Any], eval_every: int, tokens_per_step: int, block_size: int) -> int:
    """Validation tokens per evaluation when none are asked for: the preset's, or sized to the run."""
    if defaults.get("eval_tokens") is not None:
        return int(defaults["eval_tokens"])
    want = EVAL_SHARE * min(eval_every, 10**9) * tokens_per_step
    cap = defaults.get("eval_tokens_max") or 256 * block_size
    return int(max(block_size, min(cap, want)))
