"""GPT-2 weights in and out: the Hugging Face ``transformers`` layout.

A directory with ``config.json`` (``model_type: "gpt2"``) and ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``), plus ``tokenizer.json`` or ``vocab.json`` +
``merges.txt`` when present, is what ``GPT2LMHeadModel.save_pretrained`` writes and what the
Hub serves. ``load_hf`` turns it into a BarkGPT (pre-LN, biases, causal: GPT-2's design) with
its tokenizer attached; ``save_hf`` writes a BarkGPT back so ``GPT2LMHeadModel.from_pretrained``
loads it. Only safetensors are read: a pickle (``pytorch_model.bin``) can run code when loaded.

GPT-2's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``'s (out, in);
``c_attn`` packs q, k, v in that order along its output, as BarkGPT's ``qkv`` does, so the
split order carries over unchanged.

Layering: this module imports config, model, checkpoint and data; nothing below it imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint import CheckpointError
from .config import ConfigError, GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# transformers' activation names -> GPTConfig.activation. gelu_new and gelu_pytorch_tanh are
# the same function (tanh approximation), computed by a formula or by PyTorch.
_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

# GPT-2 block parameter -> BarkGPT block parameter, and whether it is a Conv1D weight (transposed).
_BLOCK_KEYS: Tuple[Tuple[str, str, bool], ...] = (
    ("ln_1.weight", "norm1.weight", False), ("ln_1.bias", "norm1.bias", False),
    ("attn.c_attn.weight", "attn.qkv.weight", True), ("attn.c_attn.bias", "attn.qkv.bias", False),
    ("attn.c_proj.weight", "attn.proj.weight", True), ("attn.c_proj.bias", "attn.proj.bias", False),
    ("ln_2.weight", "norm2.weight", False), ("ln_2.bias", "norm2.bias", False),
    ("mlp.c_fc.weight", "ff.fc.weight", True), ("mlp.c_fc.bias", "ff.fc.bias", False),
    ("mlp.c_proj.weight", "ff.proj.weight", True), ("mlp.c_proj.bias", "ff.proj.bias", False),
)
# Buffers older transformers versions saved with the weights (the causal mask and its fill value).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class HFFormatError(CheckpointError):
    """A directory cannot be read or written in the Hugging Face GPT-2 layout; the message says why."""


# ---- config ----------------------------------------------------------------------------------

def config_from_hf(d: Dict[str, Any], dropout: float = 0.0) -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 ``config.json`` (as a dict). ``dropout`` is not taken
    from the file: GPT-2 also drops attention probabilities, which BarkGPT never does, and
    fine-tuning usually runs without (nanoGPT's choice too)."""
    if not isinstance(d, dict):
        raise HFFormatError(f"config.json must be a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type != "gpt2":
        what = model_type or (archs[0] if archs else "no model_type")
        raise HFFormatError(f"config.json describes a {what!r} model; barkgpt loads GPT-2 "
                            f"(model_type 'gpt2', GPT2LMHeadModel) only")
    problems = []
    act = d.get("activation_function", "gelu_new")
    if act not in _ACT_IN:
        problems.append(f"activation_function {act!r} (barkgpt has {sorted(_ACT_IN)})")
    if d.get("scale_attn_weights", True) is not True:
        problems.append("scale_attn_weights false (barkgpt scales attention by 1/sqrt(head_dim))")
    if d.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true")
    if d.get("add_cross_attention", False):
        problems.append("add_cross_attention true (an encoder-decoder model)")
    if problems:
        raise HFFormatError("this GPT-2 variant cannot be loaded: " + "; ".join(problems))
    n_embd = d.get("n_embd", 768)
    n_inner = d.get("n_inner")
    block = d.get("n_positions", d.get("n_ctx", 1024))
    try:
        return GPTConfig(vocab_size=d.get("vocab_size", 50257), block_size=block,
                         n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_embd=n_embd,
                         dropout=dropout, bias=True, norm_first=True, activation=_ACT_IN[act], causal=True,
                         ffn_hidden=None if n_inner is None or n_inner == 4 * n_embd else n_inner,
                         tie_embeddings=bool(d.get("tie_word_embeddings", True)),
                         layer_norm_eps=d.get("layer_norm_epsilon", 1e-5))
    except ConfigError as e:
        raise HFFormatError(f"config.json: {e}") from None


def why_not_gpt2(config: GPTConfig) -> List[str]:
    """The reasons a GPTConfig has no GPT-2 (``GPT2LMHeadModel``) equivalent; empty if it has one."""
    why = []
    if not config.norm_first:
        why.append("norm_first=False (post-LN; GPT-2 normalizes before each sublayer)")
    if not config.bias:
        why.append("bias=False (GPT-2's projections and LayerNorms always have biases)")
    if not config.causal:
        why.append("causal=False (GPT-2 always applies the causal mask)")
    if config.activation not in _ACT_OUT:
        why.append(f"activation={config.activation!r}")
    return why


def config_to_hf(config: GPTConfig, eos_token_id: Optional[int] = None) -> Dict[str, Any]:
    """A transformers ``GPT2Config`` dict for ``config``; raises HFFormatError naming why when GPT-2
    cannot express it."""
    why = why_not_gpt2(config)
    if why:
        raise HFFormatError("this model cannot be written as GPT-2: " + "; ".join(why))
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": config.ffn_hidden if config.ffn_hidden is not None and config.ffn_hidden != 4 * config.n_embd
        else None,
        "activation_function": _ACT_OUT[config.activation], "layer_norm_epsilon": config.layer_norm_eps,
        # BarkGPT drops embeddings, residual branches and the MLP's hidden layer, never attention
        # probabilities (and transformers' MLP has no hidden dropout: only what it can express).
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "dtype": "float32",
    }


# ---- weights ---------------------------------------------------------------------------------

def _expected_shapes(config: GPTConfig) -> Dict[str, Tuple[int, ...]]:
    """GPT-2 key (without the ``transformer.`` prefix) -> shape, for ``config``."""
    C, F = config.n_embd, config.ffn_dim
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,)}
    out = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C),
           "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(config.n_layer):
        out.update({f"h.{i}.{k}": s for k, s in block.items()})
    return out


def state_dict_from_hf(tensors: Dict[str, torch.Tensor], config: GPTConfig) -> Dict[str, torch.Tensor]:
    """BarkGPT state dict (tied head omitted; fp32, contiguous) from GPT-2 tensors as
    ``save_pretrained`` (keys under ``transformer.``) or the original Hub checkpoints (no prefix)
    name them. ``tensors`` is emptied as it is converted, so that only one copy of the weights is
    alive at a time. Raises HFFormatError listing missing or unexpected keys and shapes that
    disagree with ``config``."""
    body: Dict[str, torch.Tensor] = {}
    head = None
    unexpected = []
    for key in list(tensors):
        t = tensors.pop(key)
        if key == "lm_head.weight":
            head = t
            continue
        k = key[len("transformer."):] if key.startswith("transformer.") else key
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        body[k] = t
    want = _expected_shapes(config)
    unexpected += sorted(set(body) - set(want))
    missing = sorted(set(want) - set(body))
    if head is None and not config.tie_embeddings:
        missing.append("lm_head.weight")
    bad_shapes = [f"{k} {tuple(body[k].shape)} (config.json implies {want[k]})"
                  for k in want if k in body and tuple(body[k].shape) != want[k]]
    if head is not None and tuple(head.shape) != want["wte.weight"]:
        bad_shapes.append(f"lm_head.weight {tuple(head.shape)} (config.json implies {want['wte.weight']})")
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if bad_shapes:
        problems.append(f"shapes that disagree with config.json: {_few(bad_shapes)}")
    if problems:
        raise HFFormatError("the weights do not match a GPT-2 of this config.json: " + "; ".join(problems))
    if head is not None and config.tie_embeddings and not torch.equal(head, body["wte.weight"]):
        raise HFFormatError("config.json says tie_word_embeddings is true but lm_head.weight differs from "
                            "wte.weight; set \"tie_word_embeddings\": false to load the separate head")

    def take(key: str, conv: bool = False) -> torch.Tensor:
        t = body.pop(key)  # the source copy is freed as soon as it is converted
        return (t.t() if conv else t).to(torch.float32).contiguous()

    sd = {"token_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight"),
          "ln_f.weight": take("ln_f.weight"), "ln_f.bias": take("ln_f.bias")}
    for i in range(config.n_layer):
        for src, dst, conv in _BLOCK_KEYS:
            sd[f"layers.{i}.{dst}"] = take(f"h.{i}.{src}", conv)
    if not config.tie_embeddings:
        sd["head.weight"] = head.to(torch.float32).contiguous()
    return sd


def state_dict_to_hf(model) -> Dict[str, torch.Tensor]:
    """GPT-2 tensors (``save_pretrained``'s names, contiguous, on the CPU) of a BarkGPT; the head is
    written only when untied, as ``save_pretrained`` does."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["token_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"]}
    for i in range(model.config.n_layer):
        for dst, src, conv in _BLOCK_KEYS:
            t = sd[f"layers.{i}.{src}"]
            out[f"transformer.h.{i}.{dst}"] = t.t() if conv else t
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _few(items: List[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ---- directories -----------------------------------------------------------------------------

def is_hf_dir(path: str) -> bool:
    """True for a directory in the transformers layout (a config.json with a model_type), as
    opposed to a barkgpt model or run directory."""
    cpath = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cpath) or os.path.exists(os.path.join(path, "manifest.json")):
        return False
    try:
        with open(cpath, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "model_type" in d


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFFormatError(f"cannot read {path}: {e}") from None


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HFFormatError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(single):
        return _load_safetensors(single)
    if os.path.isfile(index):
        shards = _read_json(index).get("weight_map", {})
        tensors: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(shards.values())):
            if os.path.basename(shard) != shard:
                raise HFFormatError(f"{index} names a shard outside the directory: {shard!r}")
            tensors.update(_load_safetensors(os.path.join(path, shard)))
        return tensors
    pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(path, p))]
    if pickles:
        raise HFFormatError(
            f"{path} holds {pickles[0]}, a pickle, which barkgpt does not load (unpickling can run "
            f"arbitrary code). If you trust the file, convert it to safetensors once with transformers: "
            f"python -c \"from transformers import GPT2LMHeadModel as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
            f"and load {path}-safetensors")
    raise HFFormatError(f"{path} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX})")


def _byte_symbols() -> Dict[int, str]:
    """GPT-2's byte -> printable symbol table (the alphabet of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_hf_tokenizer(tok):
    """(tokenizers.Tokenizer, special tokens for tokenizer_config.json) encoding exactly as the
    barkgpt tokenizer ``tok`` does: a BPE one as it is, the byte tokenizer as byte-level BPE with
    no merges (id = byte), the bark tokenizer as a word-level one."""
    from .tokenizer import _hf_tokenizers

    hf = _hf_tokenizers()
    if tok.kind == "bpe":
        return tok._tk, ({"eos_token": tok.EOS, "bos_token": tok.EOS, "unk_token": tok.EOS}  # noqa: SLF001
                         if tok.eos_id is not None else {})
    if tok.kind == "byte":
        sym = _byte_symbols()
        tk = hf.Tokenizer(hf.models.BPE(vocab={sym[b]: b for b in range(256)}, merges=[]))
        tk.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = hf.decoders.ByteLevel()
        return tk, {}
    if tok.kind == "bark":
        tk = hf.Tokenizer(hf.models.WordLevel(vocab=dict(tok.stoi), unk_token=None))
        tk.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
        pad, eos = tok.VOCAB[tok.pad_id], tok.VOCAB[tok.eos_id]
        tk.add_special_tokens([pad, eos])
        return tk, {"eos_token": eos, "pad_token": pad}
    return None, {}


def _from_hf_tokenizer(tk):
    """A barkgpt tokenizer for a tokenizers.Tokenizer: the byte and bark tokenizers come back as
    themselves (see _to_hf_tokenizer), anything else as BPETokenizer."""
    from .data import BarkTokenizer, BPETokenizer, ByteTokenizer

    model = json.loads(tk.to_str()).get("model", {})
    vocab = tk.get_vocab(with_added_tokens=True)
    if model.get("type") == "WordLevel" and vocab == BarkTokenizer().stoi:
        return BarkTokenizer()
    if model.get("type") == "BPE" and not model.get("merges") and \
            vocab == {c: b for b, c in _byte_symbols().items()}:
        return ByteTokenizer()
    return BPETokenizer(tk)


def load_hf_tokenizer(path: str):
    """The tokenizer of a transformers GPT-2 directory (``tokenizer.json``, else ``vocab.json`` +
    ``merges.txt``) as a barkgpt BPETokenizer, or None when the directory has neither."""
    from .data import DataError
    from .tokenizer import BPETokenizer, _hf_tokenizers

    tj = os.path.join(path, TOKENIZER_FILE)
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    try:
        if os.path.isfile(tj):
            hf = _hf_tokenizers()
            return _from_hf_tokenizer(hf.Tokenizer.from_file(tj))
        if os.path.isfile(vocab) and os.path.isfile(merges):
            hf = _hf_tokenizers()
            # GPT2Tokenizer's scheme: byte-level pre-tokenization (GPT-2's regex, no prefix
            # space), BPE over the byte symbols, <|endoftext|> a special token.
            tk = hf.Tokenizer(hf.models.BPE.from_file(vocab, merges))
            tk.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = hf.decoders.ByteLevel()
            tk.post_processor = hf.processors.ByteLevel(trim_offsets=False)
            if tk.token_to_id(BPETokenizer.EOS) is not None:
                tk.add_special_tokens([BPETokenizer.EOS])
            return BPETokenizer(tk)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
        raise HFFormatError(f"the tokenizer in {path} cannot be read: {e}") from None
    return None


def tokenizer_from_path(path: str):
    """The tokenizer of a Hugging Face GPT-2 directory, or of a barkgpt model or run directory (its
    tokenizer.json), for encoding data the way that model reads it."""
    from .data import tokenizer_from_dict

    if not os.path.isdir(path):
        raise HFFormatError(f"tokenizer directory {path!r} is not a directory")
    if is_hf_dir(path):
        tok = load_hf_tokenizer(path)
    else:
        from .checkpoint import latest_checkpoint

        candidates = [path] + ([latest_checkpoint(path)] if latest_checkpoint(path) else [])
        found = [os.path.join(d, TOKENIZER_FILE) for d in candidates if os.path.isfile(os.path.join(d, TOKENIZER_FILE))]
        tok = tokenizer_from_dict(_read_json(found[0])) if found else None
    if tok is None:
        raise HFFormatError(f"{path} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    return tok


def same_tokenizer(a, b) -> bool:
    """Whether two barkgpt tokenizers map text to the same ids (same kind and vocabulary, and for
    BPE the same merges and special tokens)."""
    if a is None or b is None or a.kind != b.kind:
        return False
    if a.kind != "bpe":
        return True
    da, db = a.to_dict()["tokenizer"], b.to_dict()["tokenizer"]
    keys = ("model", "added_tokens", "pre_tokenizer", "normalizer")
    return all(da.get(k) == db.get(k) for k in keys)


def read_hf_config(path: str, dropout: float = 0.0) -> GPTConfig:
    """The GPTConfig of a local Hugging Face GPT-2 directory, from its config.json alone."""
    if not os.path.isdir(path):
        raise HFFormatError(f"{path!r} is not a directory; give a local directory holding config.json and "
                            f"model.safetensors (a Hugging Face GPT-2 checkpoint)")
    cpath = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cpath):
        raise HFFormatError(f"{path} has no {CONFIG_FILE}")
    return config_from_hf(_read_json(cpath), dropout=dropout)


def load_hf(path: str, device="cpu", backend: Optional[str] = None, dropout: float = 0.0):
    """A BarkGPT from a local directory in the Hugging Face GPT-2 layout, with its tokenizer
    attached (``model.tokenizer``, None when the directory has none). ``dropout`` sets the
    GPTConfig's (default 0: see config_from_hf)."""
    from .model import BarkGPT

    config = read_hf_config(path, dropout=dropout)
    sd = state_dict_from_hf(_read_weights(path), config)
    tokenizer = load_hf_tokenizer(path)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise HFFormatError(f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                            f"{config.vocab_size}")
    # Built on the meta device and handed the loaded tensors (assign): no random initialization
    # and no second copy of the weights.
    with torch.device("meta"):
        model = BarkGPT(config, backend=backend)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.head.weight = model.token_emb.weight
        missing = [k for k in missing if k != "head.weight"]
    if missing or unexpected or any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise HFFormatError(f"internal error: the converted weights do not fill the model "
                            f"(missing {missing[:6]}, unexpected {unexpected[:6]})")
    model.tokenizer = tokenizer
    return model.to(device)


def save_hf(model, path: str, overwrite: bool = False) -> str:
    """Write ``model`` as a directory ``transformers.GPT2LMHeadModel.from_pretrained(path)`` loads:
    config.json and model.safetensors, plus tokenizer.json and tokenizer_config.json (the
    tokenizer in the form Hugging Face ``tokenizers`` reads; load_hf gives back the same kind).
    The directory appears complete or not at all; an existing one is replaced only with
    ``overwrite``. A config GPT-2 cannot express raises HFFormatError naming why."""
    from safetensors.torch import save

    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    tok = getattr(model, "tokenizer", None)
    cfg = config_to_hf(model.config, eos_token_id=getattr(tok, "eos_id", None))
    if getattr(tok, "pad_id", None) is not None:
        cfg["pad_token_id"] = tok.pad_id
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise HFFormatError(f"{path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if os.path.exists(os.path.join(path, "manifest.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
            # --force must not turn a training run (its checkpoints) into an export
            raise HFFormatError(f"{path} holds a barkgpt model or training run; export into another directory")
        if not overwrite:
            raise HFFormatError(f"{path} exists and is not empty; choose another directory or overwrite (--force)")
    files = {CONFIG_FILE: (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
             WEIGHTS_FILE: save(state_dict_to_hf(model), metadata={"format": "pt"})}
    hf_tok, special = _to_hf_tokenizer(tok) if tok is not None else (None, {})
    if hf_tok is not None:
        files[TOKENIZER_FILE] = hf_tok.to_str().encode()
        # the generic fast class loads tokenizer.json as it is (GPT2Tokenizer would rebuild a BPE)
        files["tokenizer_config.json"] = json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
             **special}, indent=2).encode()
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-hf-", dir=parent)
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=".old-hf-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
