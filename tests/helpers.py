"""Shared test helpers: the article's model, as the external reference; running Python code in a
fresh process."""

import os
import subprocess
import sys
import textwrap

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, env=None, timeout=120):
    """Runs dedented ``code`` with this interpreter in the repository root, with the environment
    plus ``env`` and no BARKGPT_BACKEND override; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("BARKGPT_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


class ArticleBarkGPT(nn.Module):
    """The article's GPTConfig-era BarkGPT, with the layer options it may have been built with."""

    def __init__(self, c):
        super().__init__()
        self.token_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Embedding(c.block_size, c.n_embd)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(d_model=c.n_embd, nhead=c.n_head, dim_feedforward=c.ffn_dim,
                                       dropout=c.dropout, activation=c.activation, batch_first=True,
                                       norm_first=c.norm_first)
            for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)

    def forward(self, idx, causal):
        T = idx.shape[1]
        x = self.token_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T) if causal else None
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=causal)
        return self.head(self.ln_f(x))


def random_upstream_backward(out, *tensors):
    """Backward with a random upstream gradient; returns the grads of ``tensors``."""
    g = torch.randn_like(out)
    return torch.autograd.grad(out, tensors, g)
