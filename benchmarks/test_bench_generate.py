"""Generation with the KV cache against transformers and the uncached path (bench_generate.py),
under ``pytest benchmarks/``: the suite's size (small on CPU, full = the issue's GPT-2 small
setting on a GPU) and device. Checks the three agree on the weights, then records tokens/s and
the ratios in <out>/generate-<device>-<size>.{json,md}; the targets (>= 1.5x transformers,
>= 10x uncached, at size full) are reported there, not asserted (timing is the lead's, on a
quiet machine)."""

import os

import pytest

import _bench
import _report
import bench_generate


def test_generate_with_cache_vs_transformers_and_uncached():
    pytest.importorskip("transformers")
    _bench.check_budget({"group": "generate", "case": _bench.SIZE, "provider": "barkgpt-cached"})
    res = bench_generate.run(_bench.SIZE, str(_bench.DEVICE))
    # the suite's folder (benchmarks/out, ignored by git), as for every other group
    out_dir = os.environ.get("BARKGPT_BENCH_OUT") or _report.DEFAULT_OUT_DIR
    base = bench_generate.write(res, out_dir)
    print(f"\nwrote {base}.md")
    for row in res["rows"]:
        # the cached path is the model: it must agree with the uncached path on nearly every token
        assert row["tokens_equal_uncached"] >= 0.9, row
