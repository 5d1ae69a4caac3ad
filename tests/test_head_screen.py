"""The screened head of greedy / top-k generation (ops.head_topk_logits, csrc/head_screen.cpp),
with its int8 and its fp16 copy: every finite entry is bitwise the full head's, each row's exact
top k are among them, the error bound holds (also on inputs built to attain it), "auto" moves from
int8 to fp16 when int8 leaves too many candidates, and BarkGPT.generate gives the tokens of the full
head with the screen on, across weight updates, with nothing added to the state_dict."""

import copy
import os
import pickle

import pytest
import torch

from barkgpt import BarkGPT, GPTConfig, ops

pytestmark = pytest.mark.skipif(ops.unavailable_reason("cpp", "cpu") is not None,
                                reason="the head screen runs on the cpp backend")

INF = float("inf")
PRECISIONS = ("int8", "fp16")


@pytest.fixture(autouse=True)
def _auto_gemm():
    yield
    if "cpp" in ops._loaded:
        torch.ops.barkgpt_cpp.gemm_set_library("auto")


def _full(x, w):
    return ops.linear(x, w, None, backend="cpp")


def _check(x, w, k, screen=None, expect_screened=True, precision="auto"):
    """head_topk_logits(x, w, k) against the full head: finite entries bitwise equal, -inf
    elsewhere, every v with an exact logit >= the row's k-th largest kept, same argmax."""
    screen = screen or ops.HeadScreen(precision)
    before = screen.stats["screened"]
    out = ops.head_topk_logits(x, w, k, screen, backend="cpp")
    full = _full(x, w)
    assert out.shape == full.shape and out.dtype == torch.float32
    kept = out != -INF
    assert torch.equal(out[kept], full[kept])
    kth = torch.topk(full, k, dim=1).values[:, -1:]
    assert bool(kept[full >= kth].all()), "an exact top-k logit was screened out"
    assert bool((kept.sum(1) >= k).all())
    assert torch.equal(out.argmax(1), full.argmax(1))
    if expect_screened is not None:
        assert (screen.stats["screened"] == before + 1) == expect_screened
    return out, full


def _rand(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B", [1, 2, 5, 8])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 300.0])
def test_exact_at_candidates_and_top_k_kept(B, scale, precision):
    V, C = 3001, 67  # C not a multiple of 16: the masked tail of both kernels
    w, x = _rand(V, C, scale=scale, seed=1), _rand(B, C, seed=2)
    screen = ops.HeadScreen(precision)
    for k in (1, 2, 40):
        _check(x, w, k, screen)
    _check(x, w, V - 1, screen, expect_screened=False)  # more candidates than V / 8: the full head
    assert screen.stats["builds"] == 1  # one copy for every call on the same weight
    assert screen.stats["precision"] == precision and screen.stats["switches"] == 0


def _int8_copy_ok(q, scale, w):
    """The int8 copy's contract: s 127 >= max|w| per row (no overflow of the int8 range), q within
    [-127, 127], and each q_i the nearest step of the scale to w_i (to within fp32 rounding of
    w * (1 / s))."""
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert int(q.min()) >= -127
    wd, sd = w.double(), scale.double()[:, None]
    assert bool((sd[:, 0] * 127 >= wd.abs().amax(1)).all())
    zero = sd[:, 0] == 0
    assert bool((q[zero] == 0).all()) and bool((wd[zero] == 0).all())
    err = (wd - sd * q.double()).abs()
    assert bool((err <= sd * (0.5 + 127 * 2.0 ** -22)).all())  # w * fl(1 / s) is off by <= 2 ulp of 127
    want_q, want_s = _int8_ref(w)
    assert torch.equal(scale, want_s) and torch.equal(q, want_q)  # bitwise the documented definition


def _int8_ref(w):
    """head_screen_prepare_int8's copy, as csrc/head_screen.cpp defines it, in torch."""
    mx = w.abs().amax(1)
    s = mx / 127
    s = torch.where((mx > 0) & (s == 0), torch.tensor(torch.finfo(torch.float32).smallest_normal * 2.0 ** -23), s)
    while True:
        low = s.double() * 127 < mx.double()
        if not bool(low.any()):
            break
        s = torch.where(low, torch.nextafter(s, torch.tensor(INF)), s)
    r = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    q = torch.round(w * r[:, None]).clamp(-127, 127)
    tiny = ~torch.isfinite(r)  # 1 / s overflows fp32: divide in float64
    q[tiny] = torch.round(w[tiny].double() / s[tiny, None].double()).clamp(-127, 127).float()
    return q.to(torch.int8), s


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpt2_head_shape(precision):
    V, C = 50257, 768
    w = _rand(V, C, scale=0.02, seed=3)
    screen = ops.HeadScreen(precision)
    for B in (1, 8):
        out, _ = _check(_rand(B, C, seed=B), w, 1, screen)
        _check(_rand(B, C, seed=B), w, 40, screen)
    assert screen.wq.shape == (V, C)
    if precision == "fp16":
        assert screen.wq.dtype == torch.float16 and torch.equal(screen.wq, w.half()) and screen.scale is None
        assert screen.nbytes < w.nbytes // 2 + 4 * V + 1
    else:
        _int8_copy_ok(screen.wq, screen.scale, w)
        assert screen.nbytes < w.nbytes // 4 + 8 * V + 1  # 38.6 MB for GPT-2's head


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_keep_the_first_index(precision):
    V, C = 2048, 32
    w = _rand(V, C, scale=0.1, seed=4)
    x = _rand(3, C, seed=5)
    best = x[0] / x[0].norm()  # row 7 is row 0's best by far ...
    w[7], w[1500], w[900] = best, best, best  # ... and so are 1500 and 900, bitwise equal rows
    w[40] = w[41] = w[42] = x[1] / x[1].norm()
    out, full = _check(x, w, 1, precision=precision)
    assert out[0].argmax() == 7 and out[1].argmax() == 40
    assert bool(torch.isfinite(out[0, [7, 900, 1500]]).all())
    for k in (2, 3, 4):
        _check(x, w, k, precision=precision)


def test_rows_beyond_fp16_range_are_always_candidates():
    V, C = 4096, 48
    w = _rand(V, C, scale=0.05, seed=6)
    w[10, 3] = 1e5  # fp16 inf
    w[11] = -7e4  # every value beyond fp16
    w[12, 0] = 65519.0  # rounds to fp16's largest finite value
    x = _rand(4, C, seed=7)
    screen = ops.HeadScreen("fp16")
    out, full = _check(x, w, 1, screen)
    assert set(screen.always.tolist()) == {10, 11}
    assert bool(torch.isfinite(out[:, [10, 11]]).all())  # their exact logits are always computed
    _check(x, w, 40, screen)
    x[:, 3] = 1.0  # row 10 wins now
    _check(x, w, 1, screen)


def test_int8_rows_of_large_values_and_zero_rows():
    """int8 has no range limit of its own: rows of large values are screened like any other
    (no always-candidates up to norms of 2^64); rows of zeros have scale 0 and an exact 0."""
    V, C = 4096, 48
    w = _rand(V, C, scale=0.05, seed=6)
    w[10, 3] = 1e5
    w[11] = -7e4
    w[12] = 0.0
    w[13, :] = 0.0
    w[13, 5] = 3e38  # 127 s must not overflow fp32 (it is checked in float64)
    w[14, :] = 0.0
    w[14, 7] = 1e30  # a norm beyond 2^64: an always-candidate row
    w[15, 2] = -torch.finfo(torch.float32).max  # s 127 would round past fp32's largest value
    w[16] = _rand(C, scale=1e15, seed=16)  # huge, but screened
    x = _rand(4, C, seed=7)
    screen = ops.HeadScreen("int8")
    _check(x, w, 1, screen)
    _int8_copy_ok(screen.wq, screen.scale, w)
    assert set(screen.always.tolist()) == {13, 14, 15}
    assert float(screen.factor[16]) < INF
    assert float(screen.scale[12]) == 0.0 and bool((screen.wq[12] == 0).all())
    _check(x, w, 40, screen)
    x[:, 3] = 1.0  # row 10 wins now
    _check(x, w, 1, screen)
    x[:, 3] = -1.0  # row 10 is last now; row 11 or row 14 may win
    x[:, 7] = 1e-30
    _check(x, w, 3, screen)


# weights below fp16's range (its copy is 0: every row a candidate, the full head; int8's scale
# follows them down), in fp16's subnormal range, subnormal in fp32 (int8: subnormal scales), and
# products that underflow fp32 (the bound's absolute term). None: either outcome is right.
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("wscale,xscale,screened", [
    (1e-30, 1.0, {"fp16": False, "int8": True}), (1e-40, 1.0, {"fp16": False, "int8": None}),
    (1e-44, 1.0, {"fp16": False, "int8": None}), (1e-20, 1e-20, {"fp16": False, "int8": None}),
    (3e-5, 1.0, {"fp16": None, "int8": True}), (1e-3, 1e-36, {"fp16": True, "int8": True}),
    (1e-3, 1e-41, {"fp16": None, "int8": None})])
def test_tiny_and_subnormal_values(wscale, xscale, screened, precision):
    V, C = 2048, 40
    w, x = _rand(V, C, scale=wscale, seed=8), _rand(3, C, scale=xscale, seed=9)
    screen = ops.HeadScreen(precision)
    for k in (1, 5):
        _check(x, w, k, screen, expect_screened=screened[precision])
    lo, hi = ops._screen_bounds(x, screen)
    full = _full(x, w)
    assert bool((lo <= full).all()) and bool((full <= hi).all())
    if precision == "int8":
        _int8_copy_ok(screen.wq, screen.scale, w)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_huge_x(precision):
    V, C = 2048, 64
    w = _rand(V, C, scale=0.02, seed=10)
    screen = ops.HeadScreen(precision)
    _check(_rand(2, C, scale=1e25, seed=11), w, 1, screen)
    _check(_rand(2, C, scale=1e26, seed=11), w, 3, screen)
    # a bound that could overflow fp32: the full head (exact by definition)
    _check(_rand(2, C, scale=1e36, seed=11), w, 1, screen, expect_screened=False)
    assert screen.stats["switches"] == 0  # a call with no bound says nothing about int8's worth


@pytest.mark.parametrize("precision", PRECISIONS)
def test_non_finite_inputs_take_the_full_head(precision):
    V, C = 2048, 32
    w, x = _rand(V, C, seed=12), _rand(2, C, seed=13)
    screen = ops.HeadScreen(precision)
    for bad in (INF, -INF, float("nan")):
        xb = x.clone()
        xb[1, 5] = bad
        out = ops.head_topk_logits(xb, w, 1, screen, backend="cpp")
        torch.testing.assert_close(out, _full(xb, w), rtol=0, atol=0, equal_nan=True)
        wb = w.clone()
        wb[3, 3] = bad
        torch.testing.assert_close(ops.head_topk_logits(x, wb, 1, screen, backend="cpp"), _full(x, wb),
                                   rtol=0, atol=0, equal_nan=True)
    assert screen.stats["screened"] == 0 and screen.stats["full"] == 6


def test_what_the_screen_declines():
    V, C = 2048, 32
    w, x = _rand(V, C, seed=14), _rand(9, C, seed=15)
    screen = ops.HeadScreen()
    full = _full(x, w)
    assert torch.equal(ops.head_topk_logits(x, w, 1, screen, backend="cpp"), full)  # B = 9 > 8
    full2 = _full(x[:2], w)  # (not full[:2]: 9 rows are not a few-row product)
    assert torch.equal(ops.head_topk_logits(x[:2], w, V, screen, backend="cpp"), full2)  # k = V
    torch.ops.barkgpt_cpp.gemm_set_library("aten")  # the full head would not run the few-row kernel
    assert not ops.head_topk_available(None, "cpu", torch.float32)
    assert torch.equal(ops.head_topk_logits(x[:2], w, 1, screen, backend="cpp"), _full(x[:2], w))
    torch.ops.barkgpt_cpp.gemm_set_library("auto")
    assert ops.head_topk_available(None, "cpu", torch.float32)
    assert not ops.head_topk_available(None, "cpu", torch.float64)
    assert torch.equal(ops.head_topk_logits(x[:2], w, 1, screen, backend="torch"),
                       ops.linear(x[:2], w, None, backend="torch"))
    wt = w.t().contiguous().t()  # not row-major
    assert torch.equal(ops.head_topk_logits(x[:2], wt, 1, screen, backend="cpp"), _full(x[:2], wt))
    assert screen.stats["screened"] == 0 and screen.stats["full"] == 5
    with pytest.raises(TypeError, match="HeadScreen"):
        ops.head_topk_logits(x[:2], w, 1, None)
    with pytest.raises(ValueError, match="x must be"):
        ops.head_topk_logits(x[:2], w[:, :5], 1, screen)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.head_topk_logits(x[:2], w, 1.0, screen)
    with pytest.raises(ValueError, match="precision must be one of"):
        ops.HeadScreen("int4")


def test_kernels_opcheck_and_kernel_errors():
    x, w = _rand(3, 37, seed=50), _rand(100, 37, seed=51)
    lib = torch.ops.barkgpt_cpp
    s16, s8 = ops.HeadScreen("fp16"), ops.HeadScreen("int8")
    assert s16.update(w) and s8.update(w)
    xr = torch.linalg.vector_norm(x, dim=1) * 1.01
    torch.library.opcheck(lib.head_screen.default, (x, s16.wq, s16.factor, xr, 1e-40))
    torch.library.opcheck(lib.head_screen.default, (x, s8.wq, s8.factor, xr, 1e-40, s8.scale))
    for s in (s16, s8):
        for k in (1, 7):
            torch.library.opcheck(lib.head_screen_topk.default,
                                  (x, w, s.wq, s.scale, s.factor, s.max_norm, s.abs_err, k, 100))
    for huge in (True, False):
        torch.library.opcheck(lib.head_screen_prepare.default, (w, huge))
        torch.library.opcheck(lib.head_screen_prepare_int8.default, (w, huge))
        w16, norms = lib.head_screen_prepare(w, huge)
        assert torch.equal(w16, w.half())  # torch's rounding (to nearest even)
        wd, hd = w.double(), w16.double()
        want = torch.stack([wd.norm(dim=1), hd.norm(dim=1), (wd - hd).norm(dim=1)], 1)
        torch.testing.assert_close(norms, want, rtol=1e-13, atol=0)
        q, scale, norms = lib.head_screen_prepare_int8(w, huge)
        _int8_copy_ok(q, scale, w)
        dd = scale.double()[:, None] * q.double()
        want = torch.stack([wd.norm(dim=1), dd.norm(dim=1), (wd - dd).norm(dim=1), q.double().norm(dim=1)], 1)
        torch.testing.assert_close(norms, want, rtol=1e-13, atol=0)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        lib.head_screen(_rand(9, 37), s16.wq, s16.factor, torch.ones(9), 0.0)
    with pytest.raises(RuntimeError, match="float16 or int8"):
        lib.head_screen(x, w, s16.factor, xr, 0.0)
    with pytest.raises(RuntimeError, match="factor must be"):
        lib.head_screen(x, s16.wq, s16.factor[:5], xr, 0.0)
    with pytest.raises(RuntimeError, match="needs its scale"):
        lib.head_screen(x, s8.wq, s8.factor, xr, 0.0)
    with pytest.raises(RuntimeError, match="needs its scale"):
        lib.head_screen(x, s16.wq, s16.factor, xr, 0.0, s8.scale)
    with pytest.raises(RuntimeError, match="scale must be"):
        lib.head_screen(x, s8.wq, s8.factor, xr, 0.0, s8.scale[:5])
    with pytest.raises(RuntimeError, match="k must be in"):
        lib.head_screen_topk(x, w, s8.wq, s8.scale, s8.factor, s8.max_norm, 0.0, 0, 100)
    with pytest.raises(RuntimeError, match="weight must be"):
        lib.head_screen_topk(x, w[:50], s8.wq, s8.scale, s8.factor, s8.max_norm, 0.0, 1, 100)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        lib.head_screen_topk(_rand(9, 37), w, s8.wq, s8.scale, s8.factor, s8.max_norm, 0.0, 1, 100)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        lib.head_screen_prepare_int8(w.double(), True)


def test_a_screened_call_is_one_kernel_call():
    """The selection, the union and the exact recompute run inside head_screen_topk: a screened
    call (after the copy is built) dispatches no torch op besides it and the few-row query."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    w, x = _rand(5000, 64, seed=62), _rand(3, 64, seed=63)
    for precision in PRECISIONS:
        screen = ops.HeadScreen(precision)
        _check(x, w, 2, screen)
        with Ops() as seen:
            out = ops.head_topk_logits(x, w, 2, screen, backend="cpp")
        assert screen.stats["screened"] == 2
        assert [op for op in seen.seen if "gemm_few_rows" not in op] == ["barkgpt_cpp.head_screen_topk.default"]
        assert torch.equal(out, ops.head_topk_logits(x, w, 2, screen, backend="cpp"))


def test_topk_kernel_info_and_declines():
    """head_screen_topk's info: (candidate rows, most in one row); -1 without a bound, -2 over
    max_count; the exact entries bitwise linear's, -inf elsewhere."""
    V, C = 3000, 40
    w, x = _rand(V, C, scale=0.1, seed=60), _rand(4, C, seed=61)
    lib = torch.ops.barkgpt_cpp
    full = _full(x, w)
    for prec in PRECISIONS:
        s = ops.HeadScreen(prec)
        assert s.update(w)
        args = (s.wq, s.scale, s.factor, s.max_norm, s.abs_err)
        for k in (1, 3, 50):
            out, info = lib.head_screen_topk(x, w, *args, k, V)
            n, most = info.tolist()
            kept = out != -INF
            # every row of out holds the union; `most` counts one row's own candidates
            assert n == int(kept.any(0).sum()) and bool((kept.sum(1) == n).all()) and k <= most <= n
            assert torch.equal(out[kept], full[kept])
            assert lib.head_screen_topk(x, w, *args, k, most)[1].tolist() == [n, most]
            assert lib.head_screen_topk(x, w, *args, k, most - 1)[1].tolist() == [-2, most]
        xb = x.clone()
        xb[2, 0] = float("nan")
        assert lib.head_screen_topk(xb, w, *args, 1, V)[1].tolist()[0] == -1
        x2 = torch.zeros(4, 2 * C)  # rows of x with a stride other than C
        x2[:, :C] = x
        out, info = lib.head_screen_topk(x2[:, :C], w, *args, 1, V)
        assert info.tolist()[0] > 0 and torch.equal(out[out != -INF], full[out != -INF])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bound_holds_everywhere(precision):
    """|exact - approximate| <= E for every entry (random weights of several scales, down to
    subnormal fp32 weights and int8 scales, up to huge ones, rows of zeros)."""
    C = 70
    for seed, scale in enumerate((1e-44, 1e-38, 1e-3, 1.0, 1e3, 1e15, 1e20)):
        w, x = _rand(3000, C, scale=scale, seed=20 + seed), _rand(8, C, seed=30 + seed)
        w[7] = 0.0
        w[8, 1:] = 0.0
        screen = ops.HeadScreen(precision)
        assert screen.update(w)
        lo, hi = ops._screen_bounds(x, screen)
        full = _full(x, w)
        assert bool((lo <= full).all()) and bool((full <= hi).all()), scale


def test_top_k_cut_is_on_the_logits_not_after_the_temperature():
    """A logit just below the k-th that the shift by the maximum rounds onto it is not among the
    top k: it is never drawn (it was, before the cut moved ahead of the temperature; the screen's
    exactness needs this, as it leaves such logits at -inf)."""
    from barkgpt.generate import sample_next

    below = 1.0 - 2.0 ** -24  # the float below 1: 3 - 1 and 3 - below are both -2 in fp32
    logits = torch.tensor([[3.0, 1.0, below]]).expand(3000, 3)
    draws = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}


def _adversarial(C=16, V=64, seed=0):
    """x and a head built so that the screen's error nearly attains the bound on two rows at once:
    row 0's fp16 error points along x (its approximate logit is too low by ~E0), row 1's points
    against x (too high by ~E1), and row 1's exact logit sits just below row 0's. Every other row
    is far below. A bound smaller than the true one by a few percent drops row 0 (the argmax)."""
    for s in range(seed, seed + 200):
        g = torch.Generator().manual_seed(s)
        w0 = torch.randn(C, generator=g)
        h0 = w0.half().float()
        d0 = w0 - h0  # exact (Sterbenz)
        x = d0 / d0.norm()
        nd = float(d0.norm())
        # h1: row 0's fp16 copy moved one fp16 step towards d0 on a subset of the components
        towards = torch.where(d0 > 0, torch.tensor(65504.0), torch.tensor(-65504.0)).half()
        step = torch.nextafter(h0.half(), towards).float()
        gain = (step - h0) * x  # >= 0
        h1, total = h0.clone(), 0.0
        for j in torch.randperm(C, generator=g).tolist():
            if d0[j] != 0 and total + float(gain[j]) <= 1.9 * nd:
                h1[j], total = step[j], total + float(gain[j])
        if total < 1.5 * nd:
            continue
        mu = total / nd - 1 + 1e-3  # f1 = f0 + total - (1 + mu) nd = f0 - 1e-3 nd
        w1 = h1 - mu * d0
        if not torch.equal(w1.half().float(), h1):
            continue
        w = torch.empty(V, C)
        w[0], w[1] = w0, w1
        if _far_below(w, x[None].float(), g):
            return w, x[None].float()
    raise AssertionError("no adversarial case found")


def _far_below(w, x, g):
    """With rows 0 and 1 of w set: False unless row 0's exact logit beats row 1's; then fill the
    other rows along x, each 1 to 2 below both, and return True."""
    f = _full(x, w[:2])[0]
    if not f[0] > f[1]:
        return False
    others = torch.rand(w.shape[0] - 2, generator=g) + 1
    w[2:] = (float(f.min()) - others)[:, None] * x
    return True


def _adversarial_int8(C=16, V=64, seed=0):
    """As _adversarial, for the int8 copy: row 0's quantization error points along x (its
    approximate logit too low by ~E0), row 1 is row 0's copy moved one int8 step towards x on a
    subset of the components with its own error pointing against x (too high by ~E1), and row 1's
    exact logit sits just below row 0's. Row 0's largest |w| is 127 * 2^-5 exactly, so both rows
    get the scale 2^-5 and that component no error."""
    s = 2.0 ** -5
    for t in range(seed, seed + 200):
        g = torch.Generator().manual_seed(t)
        w0 = torch.randn(C, generator=g).clamp(-3.9, 3.9)
        top = int(w0.abs().argmax())
        w0[top] = 127 * s if w0[top] > 0 else -127 * s
        q0 = torch.round(w0.double() / s)
        e0 = w0.double() - s * q0  # exact
        nd = float(e0.norm())
        x = (e0 / nd).float()
        gain = s * x.double().abs()  # one step of q_j towards sign(e0_j) moves d.x by this
        q1, total = q0.clone(), 0.0
        for j in torch.randperm(C, generator=g).tolist():
            if e0[j] != 0 and abs(float(q0[j])) < 126 and total + float(gain[j]) <= 1.9 * nd:
                q1[j] += 1 if e0[j] > 0 else -1
                total += float(gain[j])
        if total < 1.5 * nd:
            continue
        mu = total / nd - 1 + 1e-3  # f1 = f0 + total - (1 + mu) nd = f0 - 1e-3 nd
        w1 = (s * q1 - mu * e0).float()
        w = torch.empty(V, C)
        w[0], w[1] = w0, w1
        q, scale, _ = torch.ops.barkgpt_cpp.head_screen_prepare_int8(w[:2], False)
        if not (bool((scale == s).all()) and torch.equal(q[0].double(), q0) and torch.equal(q[1].double(), q1)):
            continue
        if _far_below(w, x[None], g):
            return w, x[None]
    raise AssertionError("no adversarial case found")


@pytest.mark.parametrize("precision,seed", [("fp16", 0), ("fp16", 300), ("fp16", 600),
                                            ("int8", 0), ("int8", 300), ("int8", 600)])
def test_bound_is_tight_on_an_adversarial_head(precision, seed):
    w, x = (_adversarial if precision == "fp16" else _adversarial_int8)(seed=seed)
    screen = ops.HeadScreen(precision)
    out, full = _check(x, w, 1, screen)
    assert int(full.argmax()) == 0 and bool(torch.isfinite(out[0, 0]))
    screen.update(w)
    lo, hi = ops._screen_bounds(x, screen)
    assert bool((lo <= full).all()) and bool((full <= hi).all())
    lo, hi, full = lo.double(), hi.double(), full.double()
    a, E = (lo + hi) / 2, (hi - lo) / 2  # the approximate logits and the bound, to an ulp
    err = (full - a).abs()
    # the case is sharp: with 0.95 E, row 0's upper bound falls below row 1's lower bound
    shrunk = 0.95 * E
    assert float(a[0, 0] + shrunk[0, 0]) < float(a[0, 1] - shrunk[0, 1])
    assert float(err[0, 0]) > 0.95 * float(E[0, 0]) and float(err[0, 1]) > 0.95 * float(E[0, 1])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_screen_copy_is_rebuilt_when_the_weight_changes(precision):
    V, C = 2048, 32
    w, x = _rand(V, C, seed=40), _rand(2, C, seed=41)
    screen = ops.HeadScreen(precision)
    _check(x, w, 1, screen)
    _check(x, w, 3, screen)
    assert screen.stats["builds"] == 1
    with torch.no_grad():
        w[int(_full(x, w)[0].argmin())] = x[0] * 10  # in place: the worst row becomes the best
    _check(x, w, 1, screen)
    assert screen.stats["builds"] == 2
    w2 = w.clone()
    w2[5] = x[1] * 10
    _check(x, w2, 1, screen)  # another tensor
    assert screen.stats["builds"] == 3
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([p], lr=1.0)
    _check(x, p.detach(), 1, screen)
    (p * torch.randn_like(p)).sum().backward()
    opt.step()
    _check(x, p.detach(), 1, screen)
    assert screen.stats["builds"] == 5
    screen.clear()
    assert screen.wq is None and screen.nbytes == 0
    # pickled or copied, it keeps no tensors
    _check(x, w, 1, screen)
    for other in (pickle.loads(pickle.dumps(screen)), copy.deepcopy(screen)):
        assert other.wq is None and other.scale is None and other.factor is None
        assert other.mode == screen.mode and other.precision == screen.precision


def _crowded_head(V=4096, C=64, eps=0.02, seed=70):
    """Rows e + eps r_v around one direction e: the logits of a random x spread by ~eps ||x||,
    far less than int8's bound (~0.05 ||x||: most rows are candidates) and far more than fp16's
    (~1e-3 ||x||: a handful)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(C, generator=g)
    return e + eps * torch.randn(V, C, generator=g), torch.randn(1, C, generator=g)


def test_auto_switches_to_fp16_when_int8_leaves_too_many_candidates():
    w, x = _crowded_head()
    V = w.shape[0]
    forced = ops.HeadScreen("int8")
    for _ in range(3):  # forced: stays int8, each call with too many candidates takes the full head
        _check(x, w, 1, forced, expect_screened=False)
    assert forced.stats["precision"] == "int8" and forced.stats["switches"] == 0 and forced.stats["full"] == 3
    screen = ops.HeadScreen()
    assert screen.precision == "int8" and screen.stats["precision"] == "int8"
    _check(x, w, 1, screen, expect_screened=False)  # int8: a row over V / 8 candidates
    assert screen.stats["switches"] == 1 and screen.stats["precision"] == "fp16" and screen.wq is None
    for k in (1, 5):
        _check(x, w, k, screen)  # fp16 from now on (sticky), a handful of candidates
    assert screen.wq.dtype == torch.float16 and screen.stats["builds"] == 2 and screen.stats["switches"] == 1
    assert screen.stats["candidates"] < 40 and screen.mode == "auto"
    s16 = ops.HeadScreen("fp16")
    _check(x, w, 1, s16)
    assert s16.stats["switches"] == 0 and s16.stats["builds"] == 1
    assert V // ops.HEAD_SCREEN_MAX_FRACTION < V


def test_auto_switch_on_the_union_of_candidates(monkeypatch):
    """A screened call (every row within V / 8) whose union of candidates exceeds
    V / HEAD_SCREEN_INT8_MAX_FRACTION switches after returning its exact answer."""
    V, C = 2048, 32
    w, x = _rand(V, C, seed=71), _rand(4, C, seed=72)
    screen = ops.HeadScreen()
    _check(x, w, 3, screen)
    n = screen.stats["candidates"]
    assert screen.stats["switches"] == 0 and n * ops.HEAD_SCREEN_INT8_MAX_FRACTION <= V
    monkeypatch.setattr(ops, "HEAD_SCREEN_INT8_MAX_FRACTION", V // n + 1)  # now n is too many
    _check(x, w, 3, screen)  # exact, screened with int8 ...
    assert screen.stats["switches"] == 1 and screen.stats["precision"] == "fp16"
    _check(x, w, 3, screen)  # ... and the next call with fp16
    assert screen.wq.dtype == torch.float16 and screen.stats["screened"] == 3
    forced = ops.HeadScreen("int8")
    _check(x, w, 3, forced)
    assert forced.stats["switches"] == 0 and forced.wq.dtype == torch.int8


# ---- generation ---------------------------------------------------------------------------

def _model(vocab=50257, n_embd=64, block_size=24, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=n_embd, **kw)
    m = BarkGPT(cfg, backend="cpp")
    with torch.no_grad():  # sharper distributions than the init's
        for p in m.parameters():
            p.mul_(3.0)
    return m.eval()


@pytest.fixture(scope="module")
def gpt2_vocab_model():
    return _model()


class _Calls(list):
    """k of every ops.head_topk_logits call; ``screens``: the HeadScreen objects passed."""

    def __init__(self):
        super().__init__()
        self.screens = []

    def clear(self):
        super().clear()
        self.screens.clear()


def _count(monkeypatch):
    calls = _Calls()
    real = ops.head_topk_logits

    def counting(x, weight, k, screen, backend=None):
        calls.append(k)
        if not any(s is screen for s in calls.screens):
            calls.screens.append(screen)
        return real(x, weight, k, screen, backend=backend)

    monkeypatch.setattr(ops, "head_topk_logits", counting)
    return calls


def _both(m, *args, precision=None, **kw):
    """generate with the screen (of ``precision``, None: the class default), then without; the
    generator (if any) reseeded for each."""
    seed = kw.pop("seed", None)
    outs = []
    for on in (True, False):
        m.head_screen = on
        if precision is not None:
            m.head_screen_precision = precision
        if seed is not None:
            kw["generator"] = torch.Generator().manual_seed(seed)
        outs.append(m.generate(*args, **kw))
    del m.head_screen  # back to the class default
    if precision is not None:
        del m.head_screen_precision
    return outs


@pytest.mark.parametrize("precision", ("auto",) + PRECISIONS)
def test_greedy_generate_equals_the_full_head(gpt2_vocab_model, monkeypatch, precision):
    m = gpt2_vocab_model
    calls = _count(monkeypatch)
    idx = torch.randint(0, 50257, (3, 6), generator=torch.Generator().manual_seed(1))
    n = 30  # 6 + 30 > block_size 24: the window slides
    a, b = _both(m, idx, n, greedy=True, precision=precision)
    assert torch.equal(a, b) and a.shape == (3, 6 + n)
    assert calls and set(calls) == {1} and len(calls) == n
    assert len(calls.screens) == 1  # one copy for the call ...
    st = calls.screens[0].stats
    assert st["builds"] == 1 and st["screened"] == n and st["candidates"] < 3 * n * 4
    assert st["precision"] == ("fp16" if precision == "fp16" else "int8") and st["switches"] == 0
    assert calls.screens[0].wq is not None and calls.screens[0].mode == precision
    calls.clear()
    a, b = _both(m, idx, n, greedy=True, prompt_lengths=[6, 2, 4], precision=precision)  # ragged prompts
    assert torch.equal(a, b) and len(calls) == n
    a, b = _both(m, idx[:1], 8, temperature=0.0, precision=precision)  # temperature 0 is greedy
    assert torch.equal(a, b)
    assert torch.equal(a, m.generate(idx[:1], 8, greedy=True, use_cache=False))


@pytest.mark.parametrize("precision", ("auto",) + PRECISIONS)
@pytest.mark.parametrize("top_p", [None, 0.9])
def test_seeded_top_k_sampling_equals_the_full_head(gpt2_vocab_model, monkeypatch, top_p, precision):
    m = gpt2_vocab_model
    calls = _count(monkeypatch)
    idx = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(2))
    a, b = _both(m, idx, 30, temperature=0.8, top_k=40, top_p=top_p, seed=7, precision=precision)
    assert torch.equal(a, b)
    assert calls and set(calls) == {40}
    assert all(s.mode == precision for s in calls.screens)
    a, b = _both(m, idx, 12, temperature=1.7, top_k=3, top_p=top_p, seed=8, prompt_lengths=[5, 3],
                 precision=precision)
    assert torch.equal(a, b)


def test_generate_switches_to_fp16_on_a_crowded_head(monkeypatch):
    """A head whose rows crowd around one direction: "auto" starts in int8, switches to fp16 at the
    first step, and the tokens are still the full head's; a bad precision name is refused."""
    calls = _count(monkeypatch)
    m = _model(vocab=4096, n_embd=64, block_size=24)
    w, _ = _crowded_head(V=4096, C=64)
    with torch.no_grad():
        m.head.weight.copy_(w * 0.3)
    idx = torch.randint(0, 4096, (2, 4), generator=torch.Generator().manual_seed(5))
    a, b = _both(m, idx, 10, greedy=True)
    assert torch.equal(a, b)
    st = calls.screens[0].stats
    assert st["switches"] == 1 and st["precision"] == "fp16" and st["builds"] == 2 and st["screened"] >= 8
    m.head_screen_precision = "int4"
    with pytest.raises(ValueError, match="precision must be one of"):
        m.generate(idx, 10, greedy=True)
    del m.head_screen_precision


def test_no_screen_without_top_k_or_when_switched_off(gpt2_vocab_model, monkeypatch):
    m = gpt2_vocab_model
    calls = _count(monkeypatch)
    idx = torch.randint(0, 50257, (1, 4), generator=torch.Generator().manual_seed(3))
    n = m.head_screen_min_tokens
    for top_k in (None, 0, 50257, 10 ** 6):
        m.generate(idx, n, temperature=0.8, top_k=top_k, generator=torch.Generator().manual_seed(0))
    assert calls == []
    m.generate(idx, n, greedy=True, use_cache=False)
    assert calls == []
    m.head_screen = False
    m.generate(idx, n, greedy=True)
    del m.head_screen
    assert calls == []
    monkeypatch.setenv("BARKGPT_HEAD_SCREEN", "0")
    m.generate(idx, n, greedy=True)
    assert calls == []
    m.generate(idx, n - 1, greedy=True)  # too few tokens to pay for the copy
    assert calls == []
    monkeypatch.delenv("BARKGPT_HEAD_SCREEN")
    m.generate(idx, n - 1, greedy=True)
    assert calls == []
    m.generate(idx, n, greedy=True)
    assert len(calls) == n


def test_small_vocab_and_wide_embeddings_keep_the_full_head(monkeypatch):
    calls = _count(monkeypatch)
    _model(vocab=4000, n_embd=32).generate(torch.zeros(1, 2, dtype=torch.long), 8, greedy=True)
    _model(vocab=5000, n_embd=1024, block_size=12).generate(torch.zeros(1, 2, dtype=torch.long), 8, greedy=True)
    assert calls == []
    _model(vocab=5000, n_embd=32).generate(torch.zeros(1, 2, dtype=torch.long), 8, greedy=True)
    assert len(calls) == 8


def test_training_between_generates_rebuilds_the_copy(monkeypatch):
    """Fused AdamW (configure_optimizers) changes the weights in place without bumping their
    version counter: a copy kept across generate calls would go stale."""
    calls = _count(monkeypatch)
    m = _model(vocab=8192, n_embd=32, block_size=16)
    idx = torch.randint(0, 8192, (2, 4), generator=torch.Generator().manual_seed(4))
    a, b = _both(m, idx, 10, greedy=True)
    assert torch.equal(a, b) and len(calls.screens) == 1
    opt = m.configure_optimizers(learning_rate=0.05)
    m.train()
    for _ in range(2):  # steps that change the tied head / token table in place
        _, loss = m(a[:, :-1], a[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    a2, b2 = _both(m, idx, 10, greedy=True)
    assert torch.equal(a2, b2) and not torch.equal(a2, a)
    assert len(calls.screens) == 2 and all(s.stats["builds"] == 1 for s in calls.screens)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.token_emb.weight.mul_(-1.0)
    m.generate(idx, 2, greedy=True)
    m.load_state_dict(sd)  # copy_ into the same tensor: its version changes
    a3, b3 = _both(m, idx, 10, greedy=True)
    assert torch.equal(a3, a2) and torch.equal(b3, b2)


def test_no_extra_state(tmp_path, monkeypatch):
    calls = _count(monkeypatch)
    m = _model(vocab=8192, n_embd=32, block_size=16)
    keys = list(m.state_dict())
    attrs = set(vars(m))
    m.generate(torch.zeros(1, 3, dtype=torch.long), 8, greedy=True)
    assert calls.screens[0].wq is not None  # (the test's reference keeps it alive)
    assert list(m.state_dict()) == keys and set(vars(m)) == attrs
    assert not any(b is calls.screens[0].wq for b in m.buffers())
    m.save(str(tmp_path / "run"))
    from safetensors.torch import load_file

    files = [f for f in os.listdir(tmp_path / "run") if f.endswith(".safetensors")]
    saved = set()
    for f in files:
        saved |= set(load_file(str(tmp_path / "run" / f)))
    assert saved == set(m.export_state_dict())


def _flush_to_zero_head(V=64, C=16):
    """A head whose exact argmax (row 0, logit 2^-126) loses to row 1 (exact 2^-125) only because
    flush-to-zero drops row 1's subnormal products (each 2^-127): the full head says 0 there."""
    w = torch.zeros(V, C)
    w[0, 0] = 1.0
    w[1, :4] = 0.5
    w[2:, 0] = -1.0
    x = torch.zeros(1, C)
    x[0, :4] = 2.0 ** -126
    return x, w


@pytest.mark.parametrize("precision", PRECISIONS)
def test_flush_denormal_mode_takes_the_full_head(precision):
    """torch.set_flush_denormal(True) (flush-to-zero, denormals-are-zero) breaks the bounds'
    absolute term: the screen declines there and the tokens stay the full head's."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    x, w = _flush_to_zero_head()
    _check(x, w, 1, precision=precision)  # the default mode: screened, exact
    try:
        assert torch.set_flush_denormal(True)
        screen = ops.HeadScreen(precision)
        assert int(_full(x, w).argmax()) == 0  # what flushing does to the full head
        _check(x, w, 1, screen, expect_screened=False)
        assert screen.stats["full"] == 1
        assert screen.update(w)
        lo, hi = ops._screen_bounds(x, screen)  # the kernel's intervals: only the trivial one holds
        assert bool((lo == -INF).all()) and bool((hi == INF).all())
        info = torch.ops.barkgpt_cpp.head_screen_topk(x, w, screen.wq, screen.scale, screen.factor,
                                                      screen.max_norm, screen.abs_err, 1, 64)[1]
        assert info.tolist() == [-1, 0]
    finally:
        torch.set_flush_denormal(False)
    _check(x, w, 1, precision=precision)


@pytest.mark.parametrize("where", ["on_token", "forward"])
def test_an_exception_in_generate_does_not_keep_the_buffers(monkeypatch, where):
    """A traceback keeps generate's frames (an interrupted call in a notebook: sys.last_traceback):
    the KV cache and the head screen's copy must not stay alive with them."""
    import weakref

    import barkgpt.model as model_mod

    made = []

    class Spy(model_mod.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(model_mod, "KVCache", Spy)
    torch.manual_seed(0)
    m = BarkGPT(GPTConfig(vocab_size=4096, block_size=24, n_layer=1, n_head=2, n_embd=24), backend="cpp").eval()
    idx = torch.randint(0, 4096, (1, 4), generator=torch.Generator().manual_seed(13))
    refs, n = [], [0]

    def on_token(t):
        n[0] += 1
        if n[0] == 3:
            c = made[0]
            refs.extend(weakref.ref(x) for x in (c.k, c.v, c.head_screen.wq))
            if where == "on_token":
                raise RuntimeError("stop")
            m.ln_f.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))

    with pytest.raises(RuntimeError, match="stop") as info:
        m.generate(idx, 10, greedy=True, on_token=on_token)
    assert info.tb is not None and len(refs) == 3
    assert all(r() is None for r in refs)
    assert not m.training
