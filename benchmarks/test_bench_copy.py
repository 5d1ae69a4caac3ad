"""Device copy bandwidth: the ceiling the memory-bound kernels are measured against."""

import torch

import _bench as B

# Large enough to stream from memory: 2x the last-level cache at least.
NBYTES = max(4 * B.CACHE_BYTES, (1 << 30) if B.IS_CUDA else (64 << 20))


def test_copy_bandwidth(benchmark):
    n = NBYTES // 4
    src = torch.randn(n, device=B.DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    assert torch.equal(dst, src)
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    rec = {"group": "copy", "case": f"{src.numel() * 4 >> 20} MiB", "shape": {"bytes": src.numel() * 4},
           "provider": "copy_", "mode": "fwd", "dtype": "float32", "bytes": nbytes}
    B.check_budget(rec)
    benchmark.group = "copy"
    timing = B.measure(benchmark, lambda: dst.copy_(src))
    rec.update(timing, status="ok")
    if timing["median_s"]:
        rec["gbps"] = nbytes / timing["median_s"] / 1e9
        benchmark.extra_info["gbps"] = rec["gbps"]
    B.add_record(rec)
