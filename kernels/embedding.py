"""Fused token + position embedding add in Triton: ``out[b, t] = tok_weight[idx[b, t]] + pos_weight[t]``.

Three layers (Liger style):

1. ``@triton.jit`` kernels.
   * forward: one pass; each program gathers ``BLOCK_R`` token rows and their position rows
     (one read of each, one write), adds in fp32, stores in the promoted table dtype.
   * token-table gradient, deterministic without atomics: the flattened ids are sorted
     (stable) once, ``searchsorted`` gives each vocabulary row its segment of positions, and
     one program per (vocabulary row, column block[, split]) sums that segment in a fixed
     order in fp32 and writes the whole row (zeros for unused tokens, so no separate memset).
   * position-table gradient: a sum over the batch in a fixed order, per (t, column) tile.
   When a grid would leave the GPU idle (a tiny vocabulary such as bark's 9 tokens, or
   few positions), each sum is split into ``SPLIT`` fixed pieces written as fp32 partials
   and reduced afterwards in a fixed order (``_utils.sum_partials``): still no atomics, and
   a vocabulary where every token is the same id stays parallel.
2. Launchers ``embedding_add_fwd`` / ``embedding_add_bwd``: heuristic tiles (no autotune, so
   the first call on a shape equals the second), any strides for ids, tables and upstream
   gradient, launched on the tensors' device.
3. The ``torch.library`` ops ``barkgpt_triton::embedding_add_fwd`` / ``embedding_add_bwd``,
   their fake kernels and autograd are wired from the op's declaration by barkgpt/_triton.py.
   Ids outside ``[0, V)`` raise IndexError and are never read (the kernel masks them whatever
   the ids): on CPU tensors the op body checks them on the host; on CUDA the forward kernel
   flags them and a later call raises, without a host sync (``_IdCheck``,
   ``raise_pending_id_errors``; ``ids_checked_on_device`` tells the op body which applies).
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from ._utils import device_ctx, pow2_floor, sm_count, sum_partials, warps_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_MAX_BLOCK_C = 256  # column block: 256 divides the usual widths (768, 1024, ...) with no waste
_FWD_TILE = 4096
_BWD_TILE = 2048
_MAX_SPLIT = 64


# ---- 1. kernels ----------------------------------------------------------------------------

@triton.jit
def _embedding_add_fwd_kernel(
    IDX,  # (B, T) int32/int64, any strides
    TOK,  # (V, C) any strides
    POS,  # (P, C) any strides, P >= T
    OUT,  # (B, T, C) contiguous, promoted dtype
    stride_ib, stride_it, stride_tv, stride_tc, stride_pt, stride_pc,
    n_tokens, T, C, V,
    BAD,  # (1,) int64 flag, written only where an id is outside [0, V) (when CHECK_IDS)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHECK_IDS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat b * T + t
    r_ok = r < n_tokens
    b = r // T
    t = r - b * T
    ids = tl.load(IDX + b * stride_ib + t * stride_it, mask=r_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = r_ok[:, None] & (cols < C)[None, :]
    # Never read outside the table (such rows get no token embedding); on CUDA the bad id is
    # also written to BAD, which the host reads back later without waiting (see _IdCheck).
    id_ok = (ids >= 0) & (ids < V)
    if CHECK_IDS:
        bad = r_ok & ((ids < 0) | (ids >= V))
        tl.store(BAD + tl.zeros_like(ids), ids, mask=bad)  # any one bad id will do
    tok = tl.load(TOK + ids[:, None] * stride_tv + cols[None, :] * stride_tc, mask=mask & id_ok[:, None], other=0.0)
    pos = tl.load(POS + t[:, None] * stride_pt + cols[None, :] * stride_pc, mask=mask, other=0.0)
    out = tok.to(tl.float32) + pos.to(tl.float32)
    tl.store(OUT + r[:, None] * C + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _embedding_add_bwd_tok_kernel(
    DOUT,  # (B, T, C) any strides
    ORDER,  # (B * T,) int64: flat positions sorted by token id (stable)
    BOUNDS,  # (V + 1,) int64: positions of token v are ORDER[BOUNDS[v]:BOUNDS[v + 1]]
    DTOK,  # (SPLIT, V, C) contiguous: fp32 partials, or the (V, C) gradient when SPLIT == 1
    stride_db, stride_dt, stride_dc, T, V, C, SPLIT,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    v = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2).to(tl.int64)
    col_ok = cols < C
    start = tl.load(BOUNDS + v)
    n = tl.load(BOUNDS + v + 1) - start
    lo = start + (n * s) // SPLIT
    hi = start + (n * (s + 1)) // SPLIT
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < hi
        r = tl.load(ORDER + p, mask=p_ok, other=0)
        b = r // T
        t = r - b * T
        g = tl.load(DOUT + b[:, None] * stride_db + t[:, None] * stride_dt + cols[None, :] * stride_dc,
                    mask=p_ok[:, None] & col_ok[None, :], other=0.0)
        acc += g.to(tl.float32)
    tl.store(DTOK + (s * V + v) * C + cols, tl.sum(acc, 0).to(DTOK.dtype.element_ty), mask=col_ok)


@triton.jit
def _embedding_add_bwd_pos_kernel(
    DOUT,  # (B, T, C) any strides
    DPOS,  # (SPLIT, T, C) contiguous: fp32 partials, or rows [0, T) of the gradient when SPLIT == 1
    stride_db, stride_dt, stride_dc, B, T, C, SPLIT,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2).to(tl.int64)
    mask = (t < T)[:, None] & (cols < C)[None, :]
    ptrs = DOUT + t[:, None] * stride_dt + cols[None, :] * stride_dc
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for b in range((B * s) // SPLIT, (B * (s + 1)) // SPLIT):
        acc += tl.load(ptrs + tl.cast(b, tl.int64) * stride_db, mask=mask, other=0.0).to(tl.float32)
    tl.store(DPOS + (s * T + t[:, None]) * C + cols[None, :], acc.to(DPOS.dtype.element_ty), mask=mask)


# ---- 2. launchers --------------------------------------------------------------------------

class _IdCheck:
    """Out-of-range token ids on CUDA, found without a host sync.

    The host check (``aminmax`` then ``int()``) waits for the GPU on every call, inside
    ``torch.compile`` too. On CUDA the forward kernel instead writes any bad id to a one-element
    flag (reset to a sentinel before the launch), the flag is copied to pinned host memory behind
    the kernel and a CUDA event marks the copy. Every later forward (and ``raise_pending``)
    looks at the copies whose events have completed, without waiting, and raises IndexError for
    the first bad one: an error surfaces a call or a few later, never silently (the kernel reads
    no row outside the table meanwhile). At most ``max_pending`` copies are in flight; beyond
    that the oldest is waited for. CPU tensors (the interpreter) keep the host check, which
    costs no sync there; ``force`` = True makes them take this path too (tests).
    """

    SENTINEL = -(1 << 63)

    def __init__(self, max_pending: int = 64):
        self.max_pending = max_pending
        self.pending = []  # (flag copy on the host, event or None, vocab size)
        self.force = False

    def on_device(self, idx: torch.Tensor) -> bool:
        if idx.numel() == 0:
            return False
        if idx.is_cuda:
            # Nothing can be read back from inside a CUDA graph capture: the kernel only masks.
            return not torch.cuda.is_current_stream_capturing()
        return self.force

    def start(self, idx: torch.Tensor, vocab_size: int) -> torch.Tensor:
        self.raise_pending(wait=False)
        return torch.full((1,), self.SENTINEL, dtype=torch.int64, device=idx.device)

    def finish(self, flag: torch.Tensor, idx: torch.Tensor, vocab_size: int) -> None:
        if flag.is_cuda:
            host = torch.empty((1,), dtype=torch.int64, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = flag, None
        self.pending.append((host, event, vocab_size))
        if len(self.pending) > self.max_pending:
            self._check(*self.pending.pop(0), wait=True)

    def raise_pending(self, wait: bool = True) -> None:
        """Raise IndexError if a finished forward saw an out-of-range id; ``wait`` waits for the
        ones still running (a host sync: call it where one happens anyway, e.g. at logging)."""
        while self.pending:
            host, event, vocab_size = self.pending[0]
            if event is not None and not wait and not event.query():
                return
            self.pending.pop(0)
            self._check(host, event, vocab_size, wait)

    def _check(self, host, event, vocab_size, wait) -> None:
        if event is not None and wait:
            event.synchronize()
        bad = int(host[0])
        if bad != self.SENTINEL:
            self.pending.clear()
            raise IndexError(f"token id {bad} is out of range for a vocabulary of {vocab_size} "
                             f"(valid ids are 0..{vocab_size - 1}); check the tokenizer and vocab_size "
                             f"(found on the GPU by an earlier embedding_add call, reported here "
                             f"without waiting for the GPU)")


_ID_CHECK = _IdCheck()


def ids_checked_on_device(idx: torch.Tensor) -> bool:
    """True where ``embedding_add_fwd`` checks ``idx`` itself (CUDA, not capturing a graph): the
    op body then skips the host check, which would wait for the GPU."""
    return _ID_CHECK.on_device(idx)


def raise_pending_id_errors(wait: bool = True) -> None:
    """Raise IndexError now if any finished Triton embedding forward on CUDA saw an out-of-range
    token id (``wait``: also wait for the ones in flight)."""
    _ID_CHECK.raise_pending(wait)

class _Tile(NamedTuple):
    block_rows: int
    block_c: int
    num_warps: int


def _tile(rows: int, C: int, target_elems: int, min_programs: int) -> _Tile:
    """Column block up to _MAX_BLOCK_C; rows fill ``target_elems`` but keep >= min_programs row tiles."""
    block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
    block_rows = max(1, min(target_elems // block_c, pow2_floor(triton.cdiv(rows, min_programs))))
    return _Tile(block_rows, block_c, warps_for(block_rows * block_c, 8))


def _tok_bwd_tile(C: int) -> _Tile:
    """Token-gradient tile: ``BLOCK_P`` positions of one segment summed per loop step. Fixed, not
    sized from the mean segment length (1 at GPT-2's vocabulary), which made the most frequent
    token's rows (5% of a batch in real text) load one dependent row at a time."""
    block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
    block_p = max(1, _BWD_TILE // block_c)
    return _Tile(block_p, block_c, warps_for(block_p * block_c, 8))


def _split(programs: int, work: int, device: torch.device) -> int:
    """Pieces per sum so that ~2 programs per SM exist; never more pieces than ``work`` items."""
    want = triton.cdiv(2 * sm_count(device), max(programs, 1))
    return max(1, min(want, work, _MAX_SPLIT))


def embedding_add_fwd(idx: torch.Tensor, tok_weight: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """On CUDA (outside a graph capture) bad ids are flagged on the device for ``_ID_CHECK`` to
    read back later; elsewhere the caller has checked them on the host."""
    device_check = _ID_CHECK.on_device(idx)
    B, T = idx.shape
    C = tok_weight.shape[1]
    out = torch.empty((B, T, C), dtype=torch.promote_types(tok_weight.dtype, pos_weight.dtype),
                      device=tok_weight.device)
    n_tokens = B * T
    if out.numel() == 0:
        return out
    tile = _tile(n_tokens, C, _FWD_TILE, 2 * sm_count(idx.device))
    grid = (triton.cdiv(n_tokens, tile.block_rows), triton.cdiv(C, tile.block_c))
    V = tok_weight.shape[0]
    check = _ID_CHECK.start(idx, V) if device_check else None
    with device_ctx(idx):
        _embedding_add_fwd_kernel[grid](
            idx, tok_weight, pos_weight, out,
            idx.stride(0), idx.stride(1), tok_weight.stride(0), tok_weight.stride(1),
            pos_weight.stride(0), pos_weight.stride(1), n_tokens, T, C, V,
            check if check is not None else out,
            BLOCK_R=tile.block_rows, BLOCK_C=tile.block_c, CHECK_IDS=check is not None, num_warps=tile.num_warps)
    if check is not None:
        _ID_CHECK.finish(check, idx, V)
    return out


def embedding_add_bwd(dout: torch.Tensor, idx: torch.Tensor, vocab_size: int,
                      n_pos: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the token table (vocab_size, C) and the position table (n_pos, C), in dout's
    dtype (the tables share it: callers promote them first)."""
    B, T, C = dout.shape
    dev = dout.device
    n_tokens = B * T
    dtok = torch.empty((vocab_size, C), dtype=dout.dtype, device=dev)
    dpos = torch.empty((n_pos, C), dtype=dout.dtype, device=dev)
    if T < n_pos:
        dpos[T:].zero_()
    if n_tokens == 0 or C == 0:
        return dtok.zero_(), dpos.zero_()

    # Token table: positions grouped by id. int32 keys sort faster; the stable sort keeps each
    # group in increasing position order, so the summation order is fixed.
    keys = idx.reshape(-1).to(torch.int32)
    sorted_ids, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_ids, torch.arange(vocab_size + 1, dtype=torch.int32, device=dev))
    tile = _tok_bwd_tile(C)
    n_cb = triton.cdiv(C, tile.block_c)
    # Split every segment when the vocabulary alone cannot fill the GPU (bark's 9 tokens); the
    # mean segment length only caps the pieces (a piece is never empty on average).
    split = _split(vocab_size * n_cb, triton.cdiv(n_tokens, vocab_size), dev)
    target = dtok if split == 1 else torch.empty((split, vocab_size, C), dtype=torch.float32, device=dev)
    with device_ctx(dout):
        _embedding_add_bwd_tok_kernel[(vocab_size, n_cb, split)](
            dout, order, bounds, target, dout.stride(0), dout.stride(1), dout.stride(2),
            T, vocab_size, C, split,
            BLOCK_P=tile.block_rows, BLOCK_C=tile.block_c, num_warps=tile.num_warps)
    if split > 1:
        sum_partials(target.view(split, vocab_size * C), dtok.view(-1))

    # Position table: rows [0, T) summed over the batch; rows [T, n_pos) stay zero.
    tile = _tile(T, C, _BWD_TILE, 1)
    grid_tc = triton.cdiv(T, tile.block_rows) * triton.cdiv(C, tile.block_c)
    split = _split(grid_tc, B, dev)
    target = dpos if split == 1 else torch.empty((split, T, C), dtype=torch.float32, device=dev)
    with device_ctx(dout):
        _embedding_add_bwd_pos_kernel[(triton.cdiv(T, tile.block_rows), triton.cdiv(C, tile.block_c), split)](
            dout, target, dout.stride(0), dout.stride(1), dout.stride(2), B, T, C, split,
            BLOCK_T=tile.block_rows, BLOCK_C=tile.block_c, num_warps=tile.num_warps)
    if split > 1:
        sum_partials(target.view(split, T * C), dpos[:T].view(-1))
    return dtok, dpos
