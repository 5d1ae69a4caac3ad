"""BarkGPT: a GPT decoder built from a GPTConfig. Calls barkgpt.ops only, never kernels directly."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from ._checks import check_token_ids
from .config import ConfigError, GPTConfig

_PREFIXES = ("_orig_mod.", "module.")
# How BarkGPT.save writes a model: barkgpt.checkpoint registers its save_model on import (the
# checkpoint layer builds on the model, never the other way round).
_saver: Optional[Callable[["BarkGPT", str], str]] = None


def register_saver(fn: Callable[["BarkGPT", str], str]) -> None:
    global _saver
    _saver = fn


def strip_prefixes(sd: Dict[str, Any]) -> Dict[str, Any]:
    """Drop torch.compile (``_orig_mod.``) and DDP (``module.``) key prefixes."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


class _Runtime:
    """Settings shared by every module of one model (so set_backend reaches all of them)."""

    def __init__(self, backend: Optional[str]):
        self.backend = backend


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) whose product goes through ops.linear: on
    the cpp backend oneDNN or the few-row decode kernel instead of MKL (csrc/gemm.h). Under
    autocast it is F.linear, so autocast's casts apply as to any nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rt: _Runtime):
        super().__init__(in_features, out_features, bias=bias)
        self.rt = rt

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias)
        return ops.linear(x, self.weight, self.bias, backend=self.rt.backend)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1), via ops.layer_norm."""

    def __init__(self, n: int, bias: bool, eps: float, rt: _Runtime):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.eps = eps
        self.rt = rt

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.rt.backend)


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, rt: _Runtime):
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        # q, k, v packed in one projection like nn.MultiheadAttention's in_proj ([Wq; Wk; Wv]).
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, config.bias, rt)
        self.proj = Linear(config.n_embd, config.n_embd, config.bias, rt)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rt = rt

    def forward(self, x, cache: Optional["KVCache"] = None, layer: int = 0):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        # Strided views of the fused projection: (B, nh, T, hs) each, no copies.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if cache is None:
            y = ops.attention(q, k, v, causal=self.causal, backend=self.rt.backend)  # (B, nh, T, hs)
        else:
            off = cache.length
            kc, vc = cache.k[layer], cache.v[layer]  # (B, nh, block_size, hs)
            kc[:, :, off:off + T] = k
            vc[:, :, off:off + T] = v
            if off == 0 and cache.start is None:  # a prompt with no padding: plain causal attention
                y = ops.attention(q, k, v, causal=True, backend=self.rt.backend)
            else:
                # Under autocast q comes out of the projection in the autocast dtype while the cache
                # keeps the model's (the copies above cast k and v into it): q follows the cache.
                y = ops.cached_attention(q.to(kc.dtype), kc, vc, cache.start, off, backend=self.rt.backend)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig, rt: _Runtime):
        super().__init__()
        self.fc = Linear(config.n_embd, config.ffn_dim, config.bias, rt)
        self.proj = Linear(config.ffn_dim, config.n_embd, config.bias, rt)
        self.dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x):
        h = self.fc(x)
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.gelu(h)
        return self.resid_dropout(self.proj(self.dropout(h)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, rt: _Runtime):
        super().__init__()
        self.norm_first = config.norm_first
        self.norm1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps, rt)
        self.attn = SelfAttention(config, rt)
        self.norm2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps, rt)
        self.ff = FeedForward(config, rt)

    def forward(self, x, cache: Optional["KVCache"] = None, layer: int = 0):
        if self.norm_first:  # GPT-2: x + f(LN(x))
            x = x + self.attn(self.norm1(x), cache, layer)
            return x + self.ff(self.norm2(x))
        x = self.norm1(x + self.attn(x, cache, layer))  # the article's nn.TransformerEncoderLayer: LN(x + f(x))
        return self.norm2(x + self.ff(x))


class KVCache:
    """Keys and values of every layer for generation: ``k``/``v`` of shape
    (n_layer, B, n_head, block_size, head_dim), preallocated once in the model's dtype on its
    device. ``length`` positions are filled; ``start`` (B,) is each row's first real position
    (left padding) or None when no row is padded."""

    def __init__(self, config: GPTConfig, batch_size: int, dtype: torch.dtype, device):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, hs)
        # Never read before written (cached_attention reads positions < length only).
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.start: Optional[torch.Tensor] = None
        # Set by generate when its draws need only each row's head_top_k largest logits (1:
        # greedy): forward_cached may then return logits exact at a superset of those and -inf
        # elsewhere (ops.head_topk_logits, with the int8 / fp16 copy of the head in head_screen). None:
        # the full logits.
        self.head_top_k: Optional[int] = None
        self.head_screen: Optional[ops.HeadScreen] = None
        # Set by generate, whose steps run no user code between them except on_token (and hooks
        # on the model itself, with which it leaves this off): the checks of the fused step and
        # of the screened head (plan()) are made once, at the first step that needs them, and
        # kept until forget_plans(), which generate calls after every on_token. Off: checked at
        # every step (what a caller that changes the model between its own forward_cached calls
        # needs).
        self.keep_plans = False
        self._plans: dict = {}

    def plan(self, name: str, check: Callable[[], Any]) -> Any:
        """check()'s answer; with keep_plans, the one kept under ``name`` since the last
        forget_plans() (check() runs only the first time)."""
        if not self.keep_plans:
            return check()
        if name not in self._plans:
            self._plans[name] = check()
        return self._plans[name]

    def free(self) -> None:
        """Drop the keys, values and head-screen copy now (the cache cannot be used afterwards):
        generate calls it when it raises, so that a traceback holding its frames (an interrupted
        call in an interactive session) does not hold the buffers."""
        self.k = self.v = None
        self.head_screen = None
        self.forget_plans()

    def forget_plans(self) -> None:
        """Make the next step check again whether it may take the fused step and the screened head."""
        self._plans.clear()

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reset(self, start: Optional[torch.Tensor] = None) -> None:
        self.length, self.start = 0, start


class BarkGPT(nn.Module):
    """GPT language model.

    ``backend`` picks the kernels for attention, LayerNorm, the embedding add and the fused
    head + loss ("triton", "cpp", "torch" or None for auto by device; see barkgpt.ops).
    Attention-probability dropout is not applied (the fused kernels have none); dropout
    acts on the embeddings, the feed-forward hidden layer and both residual branches.
    """

    def __init__(self, config: GPTConfig, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"BarkGPT needs a GPTConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        if backend is not None and backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(ops.BACKENDS)} or None")
        self.rt = _Runtime(None if backend == "auto" else backend)
        self.tokenizer = None  # set by training / barkgpt.load; saved with the model

        self.token_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config, self.rt) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps, self.rt)
        self.head = Linear(config.n_embd, config.vocab_size, False, self.rt)
        if config.tie_embeddings:
            self.head.weight = self.token_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("ff.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # ---- backend -------------------------------------------------------------------------
    @property
    def backend(self) -> Optional[str]:
        return self.rt.backend

    def set_backend(self, backend: Optional[str]) -> "BarkGPT":
        if backend is not None and backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(ops.BACKENDS)} or None")
        self.rt.backend = None if backend == "auto" else backend
        return self

    def resolved_backend(self) -> str:
        """The backend that will run for this model's parameters' device."""
        return ops.resolve_backend(self.rt.backend, self.token_emb.weight.device)

    # ---- forward -------------------------------------------------------------------------
    # Vocabularies below this size take the plain head + F.cross_entropy path with targets. 0: the
    # fused path measured at least as fast as eager down to the bark presets' V = 9 (cpp, 2 threads,
    # busy machine: 1.30x at V = 9, 1.03x at 16 and 32); redo with the "vocab sweep" cases of
    # benchmarks/test_bench_linear_cross_entropy.py on a quiet machine and raise it if that loses.
    fused_loss_min_vocab: int = 0

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, ignore_index: int = -100,
                return_logits: bool = False, cache: Optional[KVCache] = None, last_only: bool = False):
        """Inference (no ``targets``): the logits ``(B, T, vocab_size)``; with ``last_only``, those
        of the last position only, ``(B, 1, vocab_size)`` (the head runs on that position alone,
        as generation needs).

        With ``targets`` (B, T): ``(None, loss)``, the mean cross-entropy over targets that are not
        ``ignore_index`` (0 when all are). The head and the loss are fused
        (``ops.linear_cross_entropy``): the (B, T, vocab_size) logits are never built, in training
        and in evaluation. ``return_logits=True`` gives ``(logits, loss)`` instead, through the
        plain head + cross-entropy path.

        With ``cache`` (generation): ``idx`` continues the cached positions, its keys and values
        are appended, and only the last position's logits are returned, (B, 1, vocab_size)."""
        if idx.dim() != 2:
            raise ValueError(f"BarkGPT expects token ids of shape (B, T), got {tuple(idx.shape)}")
        if last_only and targets is not None:
            raise ValueError("last_only is for inference: it takes no targets")
        if cache is not None:
            if targets is not None:
                raise ValueError("a forward pass with a KV cache is for generation: it takes no targets")
            return self.forward_cached(idx, cache)[:, None]
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; "
                             f"crop the input to the last {self.config.block_size} tokens")
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {(B, T)}")
        x = ops.embedding_add(idx, self.token_emb.weight, self.pos_emb.weight, backend=self.rt.backend)
        x = self.drop(x)  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        if last_only:
            return self.head(self.ln_f(x[:, -1:]))  # (B, 1, V)
        x = self.ln_f(x)
        if targets is None:
            return self.head(x)  # (B, T, V)
        if return_logits or self.config.vocab_size < self.fused_loss_min_vocab:
            logits = self.head(x)
            return (logits if return_logits else None), self.loss_from_logits(logits, targets, ignore_index)
        w = self.head.weight  # the token table when tied: its gradient reaches the shared tensor
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the custom op is not autocast-aware: cast as F.linear would
            dt = torch.get_autocast_dtype(dev)
            x, w = x.to(dt), w.to(dt)
        return None, ops.linear_cross_entropy(x, w, targets, None, ignore_index, backend=self.rt.backend)

    @staticmethod
    def loss_from_logits(logits, targets, ignore_index: int = -100):
        """Mean cross-entropy of ``logits`` (..., V) over targets that are not ``ignore_index``
        (0 when every target is ignored, as the fused path gives)."""
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(logits.shape[:-1])}")
        t = targets.reshape(-1)
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 math (fp64 models keep fp64)
        total = F.cross_entropy(logits.to(acc).reshape(-1, logits.size(-1)), t, ignore_index=ignore_index,
                                reduction="sum")
        return total / (t != ignore_index).sum().clamp_min(1)

    def loss(self, idx, targets, ignore_index: int = -100):
        """Mean next-token cross-entropy over targets that are not ``ignore_index`` (fused path)."""
        return self(idx, targets, ignore_index)[1]

    # ---- accounting ------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). ``non_embedding`` drops the position table
        and, when untied, the token table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.token_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward).

        Matmuls: 2 FLOPs per weight per token forward, over every Linear (q/k/v, output,
        feed-forward, head): 6 * N_linear. Attention scores and the weighted sum:
        2 * 2 * T * n_embd per layer forward: 12 * n_layer * n_embd * T. The causal mask's
        skipped half is counted (the PaLM/nanoGPT convention), embeddings and norms are not.
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        n_linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * n_linear + 12 * c.n_layer * c.n_embd * T

    # ---- optimizer -------------------------------------------------------------------------
    def configure_optimizers(self, weight_decay: float = 0.1, learning_rate: float = 3e-4,
                             betas=(0.9, 0.95), eps: float = 1e-8, device_type: Optional[str] = None):
        """AdamW with weight decay on matmul weights only (not on norms, biases, embeddings)."""
        emb = {id(self.token_emb.weight), id(self.pos_emb.weight)}
        decay, no_decay = [], []
        for p in self.parameters():  # tied weights appear once
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        device_type = device_type or self.token_emb.weight.device.type
        # The fused kernel (CUDA; CPU since torch 2.4) updates every parameter in one call: on CPU
        # a bark-preset step takes 0.13 ms instead of 0.50 ms, about 7% of a training step.
        extra = {"fused": True} if device_type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **extra)

    # ---- generation ------------------------------------------------------------------------
    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ``idx`` (B, T), the tokens at positions ``cache.length ..`` of each row, against
        ``cache`` (appending their keys and values) and return the last position's logits (B, V).
        Row ``b``'s position ids count from ``cache.start[b]`` (its left padding)."""
        B, T = idx.shape
        off = cache.length
        if off + T > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions; {off} are used and {T} more "
                             f"were given (past block_size generate slides the window)")
        # The prompt without padding takes plain causal attention (SelfAttention): the module loop.
        if off == 0 and cache.start is None:
            weights = None
        else:
            weights = cache.plan("fused step", lambda: self._fused_step_weights(cache))
        if weights is not None:  # embedding, every block and ln_f in one C++ call, bitwise the path below
            c, ln_f = self.config, self.ln_f
            h = ops.decode_step(idx, self.token_emb.weight, self.pos_emb.weight, weights, cache.k, cache.v,
                                cache.start, off, c.n_head, c.bias, c.norm_first, c.activation, c.layer_norm_eps,
                                ln_f.weight, ln_f.bias)
        else:
            if off == 0 and cache.start is None:
                x = ops.embedding_add(idx, self.token_emb.weight, self.pos_emb.weight, backend=self.rt.backend)
            else:
                pos = torch.arange(off, off + T, device=idx.device).expand(B, T)
                if cache.start is not None:  # padding positions get id 0; nothing attends to them
                    pos = (pos - cache.start[:, None]).clamp(min=0)
                check_token_ids(idx, self.config.vocab_size)
                x = F.embedding(idx, self.token_emb.weight) + F.embedding(pos, self.pos_emb.weight)
            x = self.drop(x)  # (B, T, C)
            for i, layer in enumerate(self.layers):
                x = layer(x, cache, i)
            h = self.ln_f(x[:, -1:])  # (B, 1, C): the head runs on the last position only
        cache.length = off + T
        k = cache.head_top_k
        if k is not None and cache.plan("screened head", lambda: self._screens_head(h)):
            if cache.head_screen is None:
                cache.head_screen = ops.HeadScreen(self.head_screen_precision)
            return ops.head_topk_logits(h[:, 0], self.head.weight, k, cache.head_screen,
                                        backend=self.rt.backend)  # (B, V), -inf outside the top-k candidates
        return self.head(h)[:, 0]  # (B, V)

    # Greedy and top-k generation on the cpp backend screen the vocabulary with a smaller copy of
    # the head (int8 with a scale per row, or fp16) and recompute exactly only the rows that can be
    # among the top k (ops.head_topk_logits): the tokens are those of the full head, bitwise, and a
    # decode step streams a quarter (int8) or half (fp16) of the head's bytes. False here (on the
    # class or a model), or the environment variable BARKGPT_HEAD_SCREEN=0, keeps the full head.
    # Vocabularies below head_screen_min_vocab or 8 * n_embd keep it too (a small head costs little
    # to stream). head_screen_precision: "auto" starts each generate call in int8 and moves to fp16
    # when the int8 bound leaves too many candidates (ops.HeadScreen); "int8" or "fp16" forces one.
    # The copy belongs to one generate call (its KVCache): made at the first screened step, its
    # memory back in the C++ kernels' output cache when generate returns. Kept across calls, it
    # would have to notice every change of the weights, and fused optimizer steps do not bump the
    # version counter it could key on. Building the fp16 copy reads the head once and writes half
    # of it: at GPT-2's head (2 threads, quiet Zen 5 VM) 6-8 ms once the kernels' output cache
    # holds a block for it (every call after the first), 80-95 ms for the first (faulting in fresh
    # huge pages), against ~1.1 ms saved per batch-1 step (benchmarks/head_screen_bench.py).
    # Calls of fewer than head_screen_min_tokens new tokens keep the full head.
    head_screen: bool = True
    head_screen_min_vocab: int = 4096
    head_screen_min_tokens: int = 8
    head_screen_precision: str = "auto"

    @staticmethod
    def _cpu_shortcut_allowed(switch: bool, env: str, t: torch.Tensor) -> bool:
        """What the cpp backend's generation shortcuts (the screened head, the fused decode step)
        both need: their switch on (the model attribute, and the environment variable ``env`` not
        0/false/no/off), not under torch.compile, ``t`` on CPU without autocast, and no global
        forward hooks (the shortcuts skip module calls)."""
        if (not switch or torch.compiler.is_compiling()
                or os.environ.get(env, "").strip().lower() in ("0", "false", "no", "off")):
            return False
        glob = nn.modules.module
        return (t.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and not glob._global_forward_hooks and not glob._global_forward_pre_hooks)

    def _screens_head(self, h: torch.Tensor) -> bool:
        """Whether the head of this cached step may be screened (ops.head_topk_logits): switched
        on, a plain bias-free head with no hooks, a vocabulary large enough to pay, fp32 on CPU
        with linear on the cpp backend's few-row kernel, no autocast, nothing to differentiate,
        not under torch.compile."""
        if not self._cpu_shortcut_allowed(self.head_screen, "BARKGPT_HEAD_SCREEN", h):
            return False
        head = self.head
        V, C = head.weight.shape
        if (type(head) is not Linear or head.bias is not None or head._forward_hooks or head._forward_pre_hooks
                or V < self.head_screen_min_vocab or V < 8 * C):
            return False
        if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
            return False
        return ops.head_topk_available(self.rt.backend, h.device, h.dtype)

    # Cached generation steps on the cpp backend run the embedding, all blocks and ln_f in one C++
    # call (ops.decode_step, csrc/decode.cpp) instead of ~20 Python module calls and torch ops per
    # block. False here (on the class or a model), or the environment variable
    # BARKGPT_FUSED_DECODE=0, keeps the loop.
    fused_decode: bool = True

    def _fused_step_weights(self, cache: KVCache) -> Optional[list]:
        """The blocks' parameters for ops.decode_step when it computes exactly what forward_cached's
        module path would: the blocks as in :meth:`_fused_decode_weights`, and around them the
        embedding tables of one dtype, a plain dropout with nothing to do and no hooks, and a
        plain ln_f as the config sets it; else None."""
        tok, pos, drop, ln_f = self.token_emb.weight, self.pos_emb.weight, self.drop, self.ln_f
        if (pos.dtype != tok.dtype or pos.device != tok.device or type(drop) is not nn.Dropout
                or drop._forward_hooks or drop._forward_pre_hooks or (drop.training and drop.p > 0)
                or type(ln_f) is not LayerNorm or ln_f._forward_hooks or ln_f._forward_pre_hooks
                or ln_f.eps != self.config.layer_norm_eps or (ln_f.bias is not None) != self.config.bias):
            return None
        trunk = (pos, ln_f.weight) if ln_f.bias is None else (pos, ln_f.weight, ln_f.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in trunk):
            return None
        return self._fused_decode_weights(tok, cache)  # tok stands for the embedded x: its dtype, device, grad

    def _fused_decode_weights(self, x: torch.Tensor, cache: KVCache) -> Optional[list]:
        """The blocks' parameters in ops.decode_layers' order when it computes exactly what the
        module loop would, else None: the cpp backend for the blocks' ops, no autocast, nothing
        to differentiate, no dropout acting, not under torch.compile, and plain blocks (the
        classes of this file, no forward hooks). Collected at every call (a few us per layer):
        parameters replaced since the last step are always the ones used."""
        if (not self._cpu_shortcut_allowed(self.fused_decode, "BARKGPT_FUSED_DECODE", x)
                or cache.k.dtype != x.dtype or cache.v.dtype != x.dtype or cache.k.device.type != "cpu"):
            return None
        if not ops.decode_layers_available(self.rt.backend, x.device, x.dtype):
            return None
        c = self.config
        bias = c.bias
        weights = []
        for blk in self.layers._modules.values():
            if type(blk) is not Block:
                return None
            m = blk._modules
            attn, ff = m["attn"], m["ff"]
            am, fm = attn._modules, ff._modules
            norms = (m["norm1"], m["norm2"])
            linears = (am["qkv"], am["proj"], fm["fc"], fm["proj"])
            drops = (am["resid_dropout"], fm["dropout"], fm["resid_dropout"])
            if (type(attn) is not SelfAttention or type(ff) is not FeedForward
                    or any(type(n) is not LayerNorm for n in norms) or any(type(lin) is not Linear for lin in linears)
                    or any(type(d) is not nn.Dropout for d in drops)):
                return None
            for mod in (blk, attn, ff) + norms + linears + drops:
                if mod._forward_hooks or mod._forward_pre_hooks:
                    return None
            # each Dropout acts by its own flag (model.eval() then dropout.train(): MC dropout)
            if any(d.training and d.p > 0 for d in drops):
                return None
            # the settings the op takes once for all blocks, as each block holds them
            if (blk.norm_first != c.norm_first or attn.n_head != c.n_head or ff.activation != c.activation
                    or norms[0].eps != c.layer_norm_eps or norms[1].eps != c.layer_norm_eps):
                return None
            for mod in (norms[0], linears[0], linears[1], norms[1], linears[2], linears[3]):
                p = mod._parameters
                b = p.get("bias")
                if (b is not None) != bias:  # a bias set or removed by hand
                    return None
                weights.append(p["weight"])
                if bias:
                    weights.append(b)
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
            return None
        return weights

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: Optional[int] = 40, top_p: Optional[float] = None, greedy: bool = False,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 on_token: Optional[Callable[[torch.Tensor], Optional[bool]]] = None,
                 use_cache: bool = True, prompt_lengths=None):
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T). Stops early once every
        row has produced ``eos_token_id`` (finished rows are padded with it).

        ``on_token(tokens)`` is called with each step's new tokens (B,) as soon as they are
        drawn (streaming); returning True stops generation there.

        Each token is drawn from softmax(logits / ``temperature``) restricted to the ``top_k``
        most likely tokens and to the smallest set holding ``top_p`` of the mass (None: no
        restriction); ``greedy`` (or ``temperature=0``; a tiny positive one samples the same
        limit) takes the most likely token. Each step the model sees the last ``block_size``
        tokens of a row (the returned rows keep all of theirs). ``generator`` makes the draws
        reproducible.

        ``prompt_lengths`` (B ints): prompts of different lengths, left-padded in ``idx`` (row
        ``b``'s prompt is its last ``prompt_lengths[b]`` tokens; the padding ids are ignored and
        kept in the result). ``use_cache`` (default): one forward pass over the prompts, then one
        token per step against per-layer key/value caches (:class:`KVCache`); once a row would
        pass ``block_size`` the cache is rebuilt from the last ``block_size`` tokens at every
        step, which is what the uncached model sees. ``use_cache=False`` runs the whole window
        through the model for every token (non-causal models always do: a new token changes
        every earlier position's output).

        On CPU with the cpp backend the weights of 2 MiB and more are moved once into memory
        advised for huge pages (same values and Parameter objects;
        ``barkgpt.ops.use_cpu_hugepages``, which ``BARKGPT_CPU_HUGEPAGES=0`` turns off). Greedy and
        top-k cached steps there screen the head with an int8 (or fp16) copy of it and recompute
        exactly only the rows that can be drawn (``ops.head_topk_logits``): the same tokens, a
        quarter (or half) of the head's bytes per step (``head_screen``, ``head_screen_precision``,
        ``BARKGPT_HEAD_SCREEN=0``)."""
        from .generate import sample_next

        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.dim() != 2:
            raise ValueError(f"generate expects token ids of shape (B, T) or (T,), got {tuple(idx.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        B, T0 = idx.shape
        lengths = self._prompt_lengths(prompt_lengths, B, T0)
        if self.token_emb.weight.device.type == "cpu" and self.resolved_backend() == "cpp":
            ops.use_cpu_hugepages(self)  # each step streams every weight: 2 MiB pages stream faster
        was_training = self.training
        self.eval()
        cache = None
        try:
            if use_cache and self.config.causal:
                # the draws need only each row's k largest logits: the head may be screened
                V = self.config.vocab_size
                head_k = 1 if greedy or temperature == 0 else (
                    top_k if isinstance(top_k, int) and not isinstance(top_k, bool) and 0 < top_k < V else None)
                if max_new_tokens < self.head_screen_min_tokens:
                    head_k = None
                next_logits, cache = self._cached_logits(B, lengths, head_k)
            else:
                next_logits, cache = self._uncached_logits(lengths), None
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            nxt = None
            for _ in range(max_new_tokens):
                logits = next_logits(idx, nxt).float()
                nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                  greedy=greedy, generator=generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                idx = torch.cat([idx, nxt[:, None]], dim=1)
                lengths += 1
                if on_token is not None:
                    if on_token(nxt):
                        break
                    if cache is not None:  # the callback may have changed the model
                        cache.forget_plans()
                if eos_token_id is not None and bool(done.all()):
                    break
        except BaseException:
            if cache is not None:  # the traceback keeps the frames, which would keep the buffers
                cache.free()
            raise
        finally:
            self.train(was_training)
        return idx

    @staticmethod
    def _prompt_lengths(prompt_lengths, B: int, T: int) -> torch.Tensor:
        """Each row's prompt length as a CPU int64 tensor (B,), checked."""
        if prompt_lengths is None:
            if T < 1:
                raise ValueError("generate needs a prompt of at least one token per row")
            return torch.full((B,), T, dtype=torch.int64)
        lengths = torch.as_tensor(prompt_lengths).detach().to("cpu").reshape(-1)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.numel() != B:
            raise ValueError(f"prompt_lengths must be {B} ints (one per row of idx), got {prompt_lengths!r}")
        lengths = lengths.to(torch.int64)
        if bool((lengths < 1).any()) or bool((lengths > T).any()):
            raise ValueError(f"prompt_lengths must be in 1..{T} (the width of idx), got {lengths.tolist()}")
        return lengths.clone()

    def _uncached_logits(self, lengths: torch.Tensor):
        bs = self.config.block_size

        def next_logits(idx, nxt):
            T = idx.shape[1]
            # the head on the last position only (at GPT-2's shape it was ~26% of an uncached step)
            if bool((lengths == T).all()):
                return self(idx[:, -bs:], last_only=True)[:, -1, :]
            # ragged rows: each row's own tokens, one row at a time
            rows = [self(idx[b:b + 1, T - int(n):][:, -bs:], last_only=True)[:, -1, :]
                    for b, n in enumerate(lengths.tolist())]
            return torch.cat(rows, dim=0)

        return next_logits

    def _cached_logits(self, B: int, lengths: torch.Tensor, head_top_k: Optional[int] = None):
        w = self.token_emb.weight
        cache = KVCache(self.config, B, w.dtype, w.device)
        cache.head_top_k = head_top_k
        # hooks on the model itself run user code at every step: then every step checks again
        cache.keep_plans = not (self._forward_hooks or self._forward_pre_hooks)
        bs = self.config.block_size

        def prefill(idx):
            ctx = lengths.clamp(max=bs)  # each row's last block_size tokens at most
            P = int(ctx.max())
            start = P - ctx
            window = idx[:, -P:]
            if bool(start.any()):
                start = start.to(w.device)
                # padding ids are never attended to: any value may stand there (-1, a pad id)
                pad = torch.arange(P, device=w.device)[None, :] < start[:, None]
                window = window.masked_fill(pad, 0)
                cache.reset(start)
            else:
                cache.reset(None)
            return self(window, cache=cache)[:, 0]

        def next_logits(idx, nxt):
            if nxt is None or cache.length >= bs:  # first step, or the window slides: rebuild
                return prefill(idx)
            return self(nxt[:, None], cache=cache)[:, 0]

        return next_logits, cache

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Write config.json + model.safetensors (+ tokenizer.json) atomically into ``directory``
        (barkgpt.checkpoint.save_model)."""
        if _saver is None:  # pragma: no cover - importing barkgpt imports barkgpt.checkpoint
            raise RuntimeError("import barkgpt.checkpoint to save models")
        return _saver(self, directory)

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """State dict with tied weights once and any torch.compile/DDP prefixes stripped."""
        sd = {k: v for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            sd.pop("head.weight", None)
        return sd

    def load_weights(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
        sd = strip_prefixes(state_dict)
        if self.config.tie_embeddings:
            sd = {k: v for k, v in sd.items() if k != "head.weight"}
            missing, unexpected = self.load_state_dict(sd, strict=False)
            missing = [m for m in missing if m != "head.weight"]
        else:
            missing, unexpected = self.load_state_dict(sd, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"weights do not match this model's config: missing {sorted(missing)[:6]}, "
                             f"unexpected {sorted(unexpected)[:6]}")

    # ---- interop with the article's model --------------------------------------------------
    @classmethod
    def from_article_state_dict(cls, state_dict: Dict[str, torch.Tensor], config: GPTConfig,
                                backend: Optional[str] = None) -> "BarkGPT":
        """Load the state dict of the article's GPTConfig-era BarkGPT (``token_emb``/``pos_emb``
        embeddings, ``layers.N`` = nn.TransformerEncoderLayer(batch_first=True), ``ln_f``,
        bias-free ``head``). ``config.norm_first``/``activation`` must be those the layers used;
        ``causal`` says whether the article model was run with a causal mask."""
        sd = dict(state_dict)
        if "pos_emb" in sd and "pos_emb.weight" not in sd:  # the first article's (1, L, C) Parameter
            sd["pos_emb.weight"] = sd.pop("pos_emb").reshape(-1, config.n_embd)
        if "head.bias" in sd:
            raise ConfigError("the article state dict has head.bias; BarkGPT's head has no bias "
                              "(the GPTConfig-era article model uses bias=False)")
        out: Dict[str, torch.Tensor] = {}
        rename = {"self_attn.in_proj_weight": "attn.qkv.weight", "self_attn.in_proj_bias": "attn.qkv.bias",
                  "self_attn.out_proj.weight": "attn.proj.weight", "self_attn.out_proj.bias": "attn.proj.bias",
                  "linear1.weight": "ff.fc.weight", "linear1.bias": "ff.fc.bias",
                  "linear2.weight": "ff.proj.weight", "linear2.bias": "ff.proj.bias",
                  "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
                  "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}
        for key, val in sd.items():
            if key.startswith("layers."):
                _, n, rest = key.split(".", 2)
                if rest not in rename:
                    raise ConfigError(f"unexpected key {key!r} in the article state dict")
                out[f"layers.{n}.{rename[rest]}"] = val
            else:
                out[key] = val
        ff = out.get("layers.0.ff.fc.weight")
        if ff is not None and ff.shape[0] != config.ffn_dim:
            raise ConfigError(f"the article's feed-forward width is {ff.shape[0]} but config.ffn_dim is "
                              f"{config.ffn_dim}; set ffn_hidden={ff.shape[0]}")
        model = cls(config, backend=backend)
        model.load_weights(out)
        return model
