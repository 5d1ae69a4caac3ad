"""Weights in huge-page memory (csrc/outputs.cpp hugepage_empty, barkgpt.ops.use_cpu_hugepages).

generate moves a CPU model's large weights into 2 MiB-aligned blocks advised for transparent
huge pages: the values, the Parameter objects and their ties must not change, everything that
works on a model (training, saving, loading) must keep working, and the memory must be given back
when the weights die.
"""

import gc
import os
import sys

import pytest
import torch

import barkgpt
from barkgpt import BarkGPT, GPTConfig, ops
from helpers import run_python

if os.environ.get("BARKGPT_NO_CPP", "") not in ("", "0"):
    pytest.skip("BARKGPT_NO_CPP is set: the cpp backend is disabled on purpose", allow_module_level=True)
if not sys.platform.startswith("linux"):
    pytest.skip("huge-page memory is Linux-only (mmap, madvise)", allow_module_level=True)

import barkgpt._cpp  # noqa: E402,F401  (loads the library)

lib = torch.ops.barkgpt_cpp
HUGE = 2 << 20
THP = lib.hugepage_mode() not in ("", "never")


def model(tie=True, vocab=5000, n_embd=128, bias=True):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=4, n_embd=n_embd, bias=bias,
                    tie_embeddings=tie, activation="gelu_tanh")
    return BarkGPT(cfg, backend="cpp").eval()


def test_hugepage_empty_gives_aligned_tracked_memory_and_gives_it_back():
    before = lib.hugepage_bytes()
    t = lib.hugepage_empty([3, 1000, 1000], torch.float32)
    assert t.shape == (3, 1000, 1000) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % HUGE == 0
    assert lib.is_hugepage_backed(t) and lib.is_hugepage_backed(t[1:])  # views share the block
    assert lib.hugepage_bytes() - before == 6 * HUGE  # 12 MB rounded up to whole 2 MiB pages
    t.fill_(1.5)
    assert float(t.sum()) == 1.5 * 3e6
    assert not lib.is_hugepage_backed(torch.empty(1000, 1000))
    assert not lib.is_hugepage_backed(t.clone())
    del t
    gc.collect()
    assert lib.hugepage_bytes() == before
    e = lib.hugepage_empty([0, 5], torch.float64)
    assert e.shape == (0, 5) and e.dtype == torch.float64
    h = lib.hugepage_empty([4, 3], torch.bfloat16)
    assert h.dtype == torch.bfloat16 and h.shape == (4, 3)


@pytest.mark.parametrize("tie", [True, False])
def test_use_cpu_hugepages_keeps_values_parameters_and_ties(tie):
    m = model(tie=tie)
    params = dict(m.named_parameters())
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    if not THP:
        assert ops.use_cpu_hugepages(m) == 0
        return
    big = {n for n, p in params.items() if p.nbytes >= HUGE}
    assert big == ({"token_emb.weight"} if tie else {"token_emb.weight", "head.weight"})
    moved = ops.use_cpu_hugepages(m)
    assert moved == sum(params[n].nbytes for n in big)
    assert ops.use_cpu_hugepages(m) == 0  # already moved
    assert dict(m.named_parameters()) == params  # the same Parameter objects
    for n, p in m.named_parameters():
        assert lib.is_hugepage_backed(p) == (n in big), n
    if tie:
        assert m.head.weight is m.token_emb.weight
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a lower threshold moves the small matrices too, the 1-D norms stay under it
    assert ops.use_cpu_hugepages(m, min_bytes=64 << 10) > 0
    assert lib.is_hugepage_backed(m.layers[0].ff.fc.weight)
    assert not lib.is_hugepage_backed(m.layers[0].norm1.weight)


def test_the_environment_turns_it_off(monkeypatch, capsys):
    from barkgpt.cli import main

    m = model()
    assert ops.cpu_hugepage_mode() == lib.hugepage_mode()
    assert ops.cpu_hugepages_enabled() == THP
    assert main(["info"]) == 0
    yes = "yes" if THP else "no"
    assert f"generation moves weights to huge pages: {yes} (transparent huge pages: " in capsys.readouterr().out
    monkeypatch.setenv("BARKGPT_CPU_HUGEPAGES", "0")
    assert not ops.cpu_hugepages_enabled()
    assert ops.use_cpu_hugepages(m) == 0
    assert not lib.is_hugepage_backed(m.token_emb.weight)
    assert main(["info"]) == 0
    assert "generation moves weights to huge pages: no" in capsys.readouterr().out


@pytest.mark.skipif(not THP, reason="this kernel has no transparent huge pages")
def test_generate_moves_the_weights_and_gives_the_same_tokens(monkeypatch):
    m = model()
    idx = torch.randint(0, 5000, (2, 5), generator=torch.Generator().manual_seed(1))
    with monkeypatch.context() as mp:
        mp.setenv("BARKGPT_CPU_HUGEPAGES", "0")
        ref = model().generate(idx, 12, greedy=True)
    m2 = model().set_backend("torch")
    m2.generate(idx, 2, greedy=True)
    assert not lib.is_hugepage_backed(m2.token_emb.weight)  # only the cpp backend moves weights
    assert not lib.is_hugepage_backed(m.token_emb.weight)
    out = m.generate(idx, 12, greedy=True)
    assert lib.is_hugepage_backed(m.token_emb.weight)
    assert torch.equal(out, m.generate(idx, 12, greedy=True))
    assert torch.equal(out, m.generate(idx, 12, greedy=True, use_cache=False))
    assert torch.equal(out, ref)


@pytest.mark.skipif(not THP, reason="this kernel has no transparent huge pages")
def test_moved_weights_train_save_and_load(tmp_path):
    m = model(tie=True)
    ops.use_cpu_hugepages(m, min_bytes=64 << 10)
    w = m.token_emb.weight
    before = w.detach().clone()
    opt = m.configure_optimizers(learning_rate=1e-2)
    m.train()
    idx = torch.randint(0, 5000, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    opt.step()
    assert lib.is_hugepage_backed(w) and not torch.equal(w.detach(), before)  # updated in place
    assert m.head.weight is w
    m.eval()
    path = m.save(str(tmp_path / "run"))
    back = barkgpt.load(path)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_freed_weights_give_their_memory_back_in_a_fresh_process():
    # A process of its own: other tests' models may still hold moved weights.
    code = (
        "import gc, torch, barkgpt._cpp; from barkgpt import BarkGPT, GPTConfig, ops\n"
        "lib = torch.ops.barkgpt_cpp\n"
        "m = BarkGPT(GPTConfig(vocab_size=20000, block_size=16, n_layer=1, n_head=2, n_embd=64), backend='cpp')\n"
        "n = ops.use_cpu_hugepages(m)\n"
        "held = lib.hugepage_bytes()\n"
        "del m; gc.collect()\n"
        "print(n, held, lib.hugepage_bytes(), lib.hugepage_mode())\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    moved, held, after, mode = r.stdout.split()
    if mode in ("", "never"):
        assert int(moved) == 0 and int(held) == 0
    else:
        assert int(moved) == 2 * 20000 * 64 * 4  # token table and (untied) head
        assert int(held) == 2 * 3 * HUGE  # each 5.1 MB table in three 2 MiB pages
    assert int(after) == 0


def _vmas_over(ptr, nbytes):
    """The /proc/self/smaps mappings that overlap [ptr, ptr + nbytes): (start, end, VmFlags)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(v, 16) for v in head.split("-"))
                cur = (a, b) if a < ptr + nbytes and b > ptr else None
            elif cur is not None and head == "VmFlags:":
                out.append((cur[0], cur[1], line.split()[1:]))
    return out


@pytest.mark.skipif(lib.output_cache_info()[4] == 0, reason="the output cache is off (BARKGPT_CPU_CACHE_MB=0)")
def test_large_outputs_are_advised_for_huge_pages_to_their_last_byte():
    """An output of 2 MiB or more from the kernels' cache lies wholly in memory advised for huge
    pages (VmFlags 'hg'), as hugepage_empty's, where rounding it up to whole 2 MiB pages adds at
    most 1/8: its tail past the last whole 2 MiB page was a mapping of 4 KiB pages of its own (the
    screened head's fp16 copy: 1.6 of its 73.6 MiB). Where rounding would add more, the tail stays
    in 4 KiB pages and nothing more is mapped (a 2 MiB + 4 byte output does not take 4 MiB)."""
    for nbytes in (20 * HUGE + 12 * 4096, 3 * HUGE, 9 * HUGE - 4):
        lib.output_cache_release()  # a new block, not an idle one that fits
        t = lib.output_empty([(nbytes + 3) // 4])
        t.fill_(1.0)
        vmas = _vmas_over(t.data_ptr(), t.nbytes)
        assert vmas and vmas[0][0] <= t.data_ptr() and vmas[-1][1] >= t.data_ptr() + t.nbytes
        assert all("hg" in flags for _, _, flags in vmas), (nbytes, vmas)
        assert lib.is_hugepage_backed(t) and t.data_ptr() % HUGE == 0
        del t
    for nbytes in (HUGE + 4, 5 * HUGE + 12 * 4096):  # rounding up would add 50% and 19%
        lib.output_cache_release()  # a new block, not an idle one that fits
        live = lib.output_cache_info()[5]
        t = lib.output_empty([(nbytes + 3) // 4])
        assert lib.output_cache_info()[5] - live == -(-nbytes // 4096) * 4096
        assert not lib.is_hugepage_backed(t) and t.data_ptr() % HUGE == 0
        del t
    small = lib.output_empty([(HUGE - 4096) // 4])  # below 2 MiB: plain pages, not advised
    assert not lib.is_hugepage_backed(small) and not lib.is_hugepage_backed(torch.empty(HUGE))
    w = torch.randn(8000, 1100)  # 16.8 MiB as fp16 (18 MiB mapped): the screen's copy, as generate makes it
    w16, _ = lib.head_screen_prepare(w, True)
    assert lib.is_hugepage_backed(w16) and all("hg" in f for _, _, f in _vmas_over(w16.data_ptr(), w16.nbytes))
    assert not lib.is_hugepage_backed(lib.head_screen_prepare(w, False)[0])
