"""A plain PyTorch GPT: what a user would write (and torch.compile) instead of using barkgpt.

nn.Embedding, nn.LayerNorm, F.scaled_dot_product_attention, nn.Linear: no barkgpt op, no custom
op, no backend dispatch. It has BarkGPT's parameter names and computes the same function, so it
loads a BarkGPT state dict and the training benchmark starts both from the same weights. The
training comparison times it eager ("plain") and under torch.compile ("compile-plain").
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.causal = c.n_head, c.causal
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hs)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class _FeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c.n_embd, c.ffn_dim, bias=c.bias)
        self.proj = nn.Linear(c.ffn_dim, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh")}[c.activation]

    def forward(self, x):
        return self.resid_dropout(self.proj(self.dropout(self.act(self.fc(x)))))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm_first = c.norm_first
        self.norm1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.attn = _Attention(c)
        self.norm2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.ff = _FeedForward(c)

    def forward(self, x):
        if self.norm_first:
            x = x + self.attn(self.norm1(x))
            return x + self.ff(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.ff(x))


class PlainGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList([_Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.token_emb.weight

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.drop(self.token_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        """The same AdamW as BarkGPT's: decay on matmul weights only, fused where it exists."""
        emb = {id(self.token_emb.weight), id(self.pos_emb.weight)}
        decay = [p for p in self.parameters() if p.dim() >= 2 and id(p) not in emb]
        keep = [p for p in self.parameters() if not (p.dim() >= 2 and id(p) not in emb)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
        extra = {"fused": True} if device_type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, **extra)


def plain_copy(barkgpt_model):
    """A PlainGPT with the same weights as ``barkgpt_model`` (a BarkGPT), on its device."""
    w = barkgpt_model.token_emb.weight
    model = PlainGPT(barkgpt_model.config).to(device=w.device, dtype=w.dtype)
    model.load_state_dict(barkgpt_model.state_dict(), strict=True)
    return model
