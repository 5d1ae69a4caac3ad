"""Launch decisions of the Triton kernels that only matter on a GPU, tested in the interpreter
(issue 19): per-architecture attention tiles, the attention grid order, the compile-time tile
checks, the LayerNorm backward's occupancy-sized grid and dW/dB sum, the embedding backward on
skewed ids, and the embedding forward's id check without a host sync."""

import importlib

import pytest
import torch

from barkgpt import opdecls, ops

kattn = importlib.import_module("barkgpt.kernels.attention")
kcfg = importlib.import_module("barkgpt.kernels._attention_config")
kln = importlib.import_module("barkgpt.kernels.layer_norm")
kemb = importlib.import_module("barkgpt.kernels.embedding")
kutils = importlib.import_module("barkgpt.kernels._utils")

if not torch.cuda.is_available():
    pytestmark = pytest.mark.skipif(not kutils.interpret_mode(), reason="needs TRITON_INTERPRET=1 without a GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Recorder:
    """Wraps a @triton.jit kernel: records each launch's grid and keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


# ---- attention -------------------------------------------------------------------------------

def test_arch_tables_map_every_architecture():
    assert kcfg.arch_table(90) == kcfg.arch_table(100) == "sm90"
    for cc in (80, 86, 89, 120, 75, 70, None):
        assert kcfg.arch_table(cc) == "sm80", cc  # no wgmma, or unknown: the tiles that fit 99 KB


def test_arch_tables_keep_the_invariants():
    for table in kcfg._ARCH_TABLES.values():
        for (kind, pad, width), c in table.items():
            assert (kind, pad, width) in kcfg._GPU_TABLE
            big, small = (c.block_n, c.block_m) if kind == "dkdv" else (c.block_m, c.block_n)
            assert big % small == 0 and small >= 16


def test_tiles_differ_per_architecture_where_the_table_says():
    """An sm80 entry is what sm_80/86/89 launches get; sm_90 keeps the base table."""
    assert kcfg._ARCH_TABLES["sm80"], "sm_80/86/89 need their own tiles (the sm_90 ones spill there)"
    for (kind, pad, width), want in kcfg._ARCH_TABLES["sm80"].items():
        dtype = torch.float32 if width == "fp32" else torch.bfloat16
        for cc in (80, 86, 89):
            assert kcfg.tile_config(kind, pad, 8192, dtype, False, arch=cc) == want
        assert kcfg.tile_config(kind, pad, 8192, dtype, False, arch=90) == kcfg._GPU_TABLE[(kind, pad, width)]


@pytest.mark.parametrize("arch, dtype, D, causal", [(86, torch.float16, 128, True),
                                                    (86, torch.float32, 32, False)])  # the 2-warp fp32 dK/dV tile
def test_arch_tiles_compute_the_right_thing(monkeypatch, arch, dtype, D, causal):
    """The per-architecture tiles, run in the interpreter, against the reference."""
    real = kcfg.tile_config
    used = []

    def table(kind, head_dim, seq_len, dtype, interpret, arch_=None):
        cfg = real(kind, head_dim, seq_len, dtype, False, arch=arch)
        used.append(cfg)
        return cfg

    monkeypatch.setattr(kcfg, "tile_config", lambda *a, arch=None: table(*a))
    q, k, v, do = (torch.randn(1, 2, 150, D, device=DEVICE, dtype=dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ops.attention(q, k, v, causal=causal, backend="triton")
    out.backward(do)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
    ref.backward(do.double())
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    for got, want in ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert len(used) == 3
    if dtype == torch.float32 and D == 32:
        assert kcfg.TileConfig(16, 32, 2, 1) in used  # sm_80/86/89's dK/dV tile that does not spill


@pytest.mark.parametrize("causal", [True, False])
def test_attention_grid_puts_batch_heads_first(monkeypatch, causal):
    """Grid (B * H, sequence tiles): blocks start in linear order with dim 0 fastest, so every
    head's heaviest causal tile starts before any lighter one (was (tiles, H, B))."""
    recs = {}
    for name in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel"):
        recs[name] = _Recorder(getattr(kattn, name))
        monkeypatch.setattr(kattn, name, recs[name])
    B, H, T, D = 2, 3, 70, 16
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, causal=causal, backend="triton")
    out.backward(torch.randn_like(out))
    ref = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=causal)
    torch.testing.assert_close(out.detach(), ref, atol=1e-4, rtol=1e-4)
    for name, rec in recs.items():
        (grid, kw), = rec.launches
        block = kw["BLOCK_N"] if "dkdv" in name else kw["BLOCK_M"]
        assert grid == (B * H, -(-T // block)), name


def test_many_batch_heads_fit_the_grid():
    """B * H above 65535 (the old per-axis limit on heads and batch) is accepted; the check now
    bounds B * H by grid dim 0's limit and T by dim 1's."""
    q = torch.empty(70000, 1, 16, 16, device="meta")
    kattn.check_inputs(q, q, q, True)
    with pytest.raises(ValueError, match="sequences up to"):
        q = torch.empty(1, 1, 65535 * 16 + 1, 16, device="meta")
        kattn.check_inputs(q, q, q, True)
    assert kattn._GRID_X_LIMIT == 2**31 - 1


@pytest.mark.parametrize("kernel,bm,bn", [("_attention_fwd_kernel", 16, 32), ("_attention_bwd_dq_kernel", 16, 32),
                                          ("_attention_bwd_dkdv_kernel", 32, 16)])
def test_unmasked_fast_paths_reject_tiles_that_do_not_divide(monkeypatch, kernel, bm, bn):
    """A tile pair where one block does not divide the other would send a diagonal-crossing tile
    down the unmasked path: tl.static_assert refuses it when the kernel is compiled."""
    real = kcfg.tile_config

    def bad(kind, head_dim, seq_len, dtype, interpret, arch=None):
        cfg = real(kind, head_dim, seq_len, dtype, interpret, arch)
        return kcfg.TileConfig(bm, bn, cfg.num_warps, cfg.num_stages)

    monkeypatch.setattr(kcfg, "tile_config", bad)
    q, k, v = (torch.randn(1, 1, 64, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    with pytest.raises(Exception, match="must divide"):
        ops.attention(q, k, v, causal=True, backend="triton").sum().backward()


def test_dq_candidates_from_the_issue_are_tuned():
    for cand in ((128, 64, 8, 2), (64, 64, 4, 3)):
        assert cand in kcfg._CANDIDATES_16BIT["dq"]


# ---- LayerNorm backward ----------------------------------------------------------------------

def test_occupancy_rule():
    # 76 registers x 256 threads: 3 blocks of 8 warps fit 64K registers, not 4 (the old grid).
    assert kutils.blocks_per_sm(76, 8, 0) == 3
    assert kutils.blocks_per_sm(64, 8, 0) == 4
    assert kutils.blocks_per_sm(32, 4, 0, threads_per_sm=1536) == 12  # sm_86: 48 warps
    assert kutils.blocks_per_sm(40, 8, 48 * 1024, smem_per_sm=100 * 1024) == 2  # shared memory bound
    assert kutils.blocks_per_sm(255, 32, 0) == 1


def test_layer_norm_backward_grid_is_one_wave():
    sms = 132
    cfg, grid = kln._bwd_config(1 << 20, 768, sms, blocks_per_sm=3)
    assert grid == 3 * sms
    # Without the compiled kernel to ask, the estimate is 3 blocks of 8 warps, not 4.
    cfg, grid = kln._bwd_config(1 << 20, 768, sms)
    assert cfg.num_warps == 8 and grid == 3 * sms


def test_layer_norm_dw_db_sum_spreads_over_the_gpu():
    """dW/dB partials for N = 768 (K = 1536 columns) were summed by 24 programs on a 132-SM GPU."""
    c = kutils.partials_config(3 * 132, 1536, 132)
    assert -(-1536 // c.block_n) >= 96 and c.block_n >= 16
    # And the narrower blocks sum correctly, in two outputs of different dtypes.
    part = torch.randn(37, 2 * 100, device=DEVICE)
    dw = torch.empty(100, device=DEVICE, dtype=torch.float16)
    db = torch.empty(100, device=DEVICE)
    kutils.sum_partials(part, dw, db)
    want = part.double().sum(0)
    torch.testing.assert_close(dw.double(), want[:100], atol=1e-2, rtol=1e-3)  # fp16 rounding
    torch.testing.assert_close(db.double(), want[100:], atol=1e-5, rtol=1e-5)


# ---- embedding -------------------------------------------------------------------------------

def _skewed_ids(B, T, V, frac):
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    n = B * T
    idx.view(-1)[torch.randperm(n)[: int(frac * n)].to(DEVICE)] = 3
    return idx


def test_token_gradient_batches_rows_whatever_the_mean_segment(monkeypatch):
    """A vocabulary larger than the batch (mean segment 1, as GPT-2's) still sums each segment
    BLOCK_P rows at a time: the frequent token's rows are not loaded one by one."""
    rec = _Recorder(kemb._embedding_add_bwd_tok_kernel)
    monkeypatch.setattr(kemb, "_embedding_add_bwd_tok_kernel", rec)
    B, T, V, C = 2, 8, 64, 8
    idx = _skewed_ids(B, T, V, 0.5)
    tok = torch.randn(V, C, device=DEVICE, requires_grad=True)
    pos = torch.randn(T, C, device=DEVICE, requires_grad=True)
    g = torch.randn(B, T, C, device=DEVICE)
    ops.embedding_add(idx, tok, pos, backend="triton").backward(g)
    (_, kw), = rec.launches
    assert kw["BLOCK_P"] >= 8
    want = torch.zeros(V, C, device=DEVICE).index_add_(0, idx.view(-1), g.view(-1, C))
    torch.testing.assert_close(tok.grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("V", [9, 300])
def test_skewed_ids_gradient_exact_and_deterministic(V):
    B, T, C = 4, 48, 24
    idx = _skewed_ids(B, T, V, 0.3)  # one segment of ~58 rows: several BLOCK_P steps at C = 24
    tok = torch.randn(V, C, device=DEVICE, requires_grad=True)
    pos = torch.randn(T, C, device=DEVICE, requires_grad=True)
    g = torch.randn(B, T, C, device=DEVICE)
    grads = []
    for _ in range(2):
        tok.grad = pos.grad = None
        ops.embedding_add(idx, tok, pos, backend="triton").backward(g)
        grads.append((tok.grad.clone(), pos.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    want = torch.zeros(V, C, dtype=torch.float64, device=DEVICE).index_add_(0, idx.view(-1), g.double().view(-1, C))
    torch.testing.assert_close(grads[0][0].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1].double(), g.double().sum(0), atol=1e-5, rtol=1e-5)


@pytest.fixture
def device_id_check(monkeypatch):
    """CPU tensors take the CUDA path of the id check: flag on the device, read back later."""
    monkeypatch.setattr(kemb._ID_CHECK, "force", True)
    monkeypatch.setattr(kemb._ID_CHECK, "pending", [])

    def no_host_check(*a, **k):
        raise AssertionError("the host id check (a GPU sync) ran")

    monkeypatch.setattr(opdecls, "check_token_ids", no_host_check)
    yield kemb._ID_CHECK


@pytest.mark.parametrize("bad", [-1, 9, 1 << 40])
def test_device_id_check_raises_on_a_later_call(device_id_check, bad):
    tok = torch.randn(9, 16, device=DEVICE)
    pos = torch.randn(8, 16, device=DEVICE)
    idx = torch.randint(0, 9, (2, 5), device=DEVICE)
    idx[1, 3] = bad
    out = ops.embedding_add(idx, tok, pos, backend="triton")  # no host read: no error yet
    torch.testing.assert_close(out[1, 3], pos[3])  # the bad row reads nothing from the table
    good = torch.randint(0, 9, (2, 5), device=DEVICE)
    with pytest.raises(IndexError, match=f"token id {bad} is out of range for a vocabulary of 9"):
        ops.embedding_add(good, tok, pos, backend="triton")
    ops.embedding_add(good, tok, pos, backend="triton")  # reported once, then the check is clear
    kemb.raise_pending_id_errors()


def test_device_id_check_explicit_read_and_clean_runs(device_id_check):
    tok = torch.randn(9, 16, device=DEVICE)
    pos = torch.randn(8, 16, device=DEVICE)
    for _ in range(3):
        ops.embedding_add(torch.randint(0, 9, (2, 5), device=DEVICE), tok, pos, backend="triton")
    kemb.raise_pending_id_errors()  # all ids were fine
    assert not device_id_check.pending
    idx = torch.randint(0, 9, (2, 5), device=DEVICE)
    idx[0, 0] = 9
    ops.embedding_add(idx, tok, pos, backend="triton")
    with pytest.raises(IndexError, match="token id 9"):
        kemb.raise_pending_id_errors()


def test_device_id_check_bounds_the_pending_reads(device_id_check, monkeypatch):
    monkeypatch.setattr(device_id_check, "max_pending", 2)
    tok = torch.randn(9, 4, device=DEVICE)
    pos = torch.randn(8, 4, device=DEVICE)
    for _ in range(5):
        ops.embedding_add(torch.randint(0, 9, (1, 3), device=DEVICE), tok, pos, backend="triton")
        assert len(device_id_check.pending) <= 2


def test_cpu_tensors_keep_the_immediate_host_check():
    tok = torch.randn(9, 16, device="cpu")
    pos = torch.randn(8, 16, device="cpu")
    idx = torch.randint(0, 9, (2, 5))
    idx[0, 2] = 12
    with pytest.raises(IndexError, match="token id 12 is out of range"):
        ops.embedding_add(idx, tok, pos, backend="triton")
    assert not kemb._ID_CHECK.pending
