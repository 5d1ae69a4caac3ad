"""FLOP/MFU arithmetic and the peak table, checked against numbers computed by hand."""

import pytest
import torch

from barkgpt import BarkGPT, GPTConfig, perf


def test_flops_per_token_hand_computed_small_config():
    c = GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=16)
    m = BarkGPT(c, backend="torch")
    # Linear weights per layer: qkv 16*48 + proj 16*16 + fc 16*64 + fc-proj 64*16 = 3072;
    # 2 layers = 6144, head 16*10 = 160 -> N_linear = 6304.
    # 6 * 6304 + 12 * n_layer(2) * n_embd(16) * T(8) = 37824 + 3072 = 40896.
    assert m.flops_per_token() == 40896
    # T = 4: the attention term halves: 37824 + 1536.
    assert m.flops_per_token(seq_len=4) == 39360


def test_flops_per_token_gpt2_hand_computed():
    with torch.device("meta"):
        m = BarkGPT(GPTConfig.preset("gpt2"), backend="torch")
    # Per layer: 768*2304 + 768*768 + 768*3072 + 3072*768 = 7,077,888; x12 = 84,934,656;
    # tied head 768*50304 = 38,633,472 (counted once, as a matmul) -> 123,568,128.
    # 6 * 123,568,128 + 12 * 12 * 768 * 1024 = 741,408,768 + 113,246,208.
    assert m.flops_per_token() == 854_654_976


def test_mfu_hand_computed():
    # GPT-2 small at 400k tokens/s on an H100 SXM in bf16 (989.4 TFLOP/s dense):
    # 854,654,976 * 4e5 / 989.4e12 = 0.345524...
    peak = perf.peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert peak == pytest.approx(989.4e12)
    assert perf.mfu(854_654_976, 4e5, peak) == pytest.approx(0.3455245, rel=1e-6)
    assert perf.mfu(854_654_976, 4e5, None) is None


@pytest.mark.parametrize("name, dtype, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, None, 989.4),
    ("NVIDIA H100 80GB HBM3", torch.float16, None, 989.4),
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.7),
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 66.9),
    ("NVIDIA H100 PCIe", torch.bfloat16, None, 756.5),
    ("NVIDIA H100 NVL", torch.bfloat16, None, 835.5),
    ("NVIDIA H200", torch.bfloat16, None, 989.4),
    ("NVIDIA H200 NVL", torch.bfloat16, None, 835.5),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, None, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
    ("NVIDIA L4", torch.bfloat16, None, 121.0),
    ("NVIDIA L40S", torch.bfloat16, None, 362.05),
    ("Tesla V100-SXM2-16GB", torch.float16, None, 125.0),
])
def test_peak_table_lookup(name, dtype, tf32, tflops, monkeypatch):
    monkeypatch.delenv(perf.PEAK_ENV_VAR, raising=False)
    assert perf.peak_flops(name, dtype, tf32=tf32) == pytest.approx(tflops * 1e12)


def test_peak_unknown_is_none_and_env_overrides(monkeypatch):
    monkeypatch.delenv(perf.PEAK_ENV_VAR, raising=False)
    assert perf.peak_flops("Some Future GPU", torch.bfloat16) is None
    assert perf.peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 on Volta
    assert perf.peak_flops(device="cpu", dtype=torch.float16) is None  # CPU: measured fp32/bf16 only, never a guess
    assert perf.peak_source("cpu") == "measured" and perf.peak_source(name="Some Future GPU") is None
    monkeypatch.setenv(perf.PEAK_ENV_VAR, "2.5")
    assert perf.peak_flops(device="cpu", dtype=torch.float32) == pytest.approx(2.5e12)
    assert perf.peak_source("cpu") == "env"


@pytest.fixture
def peak_cache(tmp_path, monkeypatch):
    """A private cache file and memo, and a probe that counts its calls."""
    monkeypatch.setenv("BARKGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(perf.PEAK_ENV_VAR, raising=False)
    monkeypatch.setattr(perf, "_cpu_peak_memo", {})
    calls = []

    def probe(dtype, n=512, seconds=0.3):
        calls.append(dtype)
        return {torch.float32: 1.25e11, torch.bfloat16: 3.5e11}[dtype]

    monkeypatch.setattr(perf, "probe_matmul_flops", probe)
    return tmp_path, calls


def test_cpu_peak_is_measured_once_and_cached_per_cpu_torch_threads_dtype(peak_cache, monkeypatch):
    import json

    tmp_path, calls = peak_cache
    assert perf.peak_flops(device="cpu", dtype=torch.float32) == 1.25e11
    assert perf.peak_flops(device="cpu", dtype=torch.bfloat16) == 3.5e11
    assert perf.peak_flops(device="cpu", dtype=torch.float32) == 1.25e11
    assert calls == [torch.float32, torch.bfloat16]  # the second fp32 lookup measured nothing
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    (key,) = [k for k in cache if k.endswith("fp32")]
    assert perf.cpu_model() in key and torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    # a new process (empty memo) reads the file instead of probing again
    monkeypatch.setattr(perf, "_cpu_peak_memo", {})
    assert perf.measured_cpu_peak(torch.float32) == 1.25e11 and len(calls) == 2
    assert perf.measured_cpu_peak(torch.float32, refresh=True) == 1.25e11 and len(calls) == 3
    # another thread count is another machine configuration: measured again
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    perf.measured_cpu_peak(torch.float32)
    assert len(calls) == 4 and any("97 threads" in k for k in json.loads((tmp_path / "cpu_peak.json").read_text()))


def test_cpu_peak_survives_a_corrupt_cache(peak_cache):
    tmp_path, calls = peak_cache
    (tmp_path / "cpu_peak.json").write_text("{not json")
    assert perf.measured_cpu_peak(torch.float32) == 1.25e11 and len(calls) == 1


def test_probe_measures_a_real_matmul_rate():
    rate = perf.probe_matmul_flops(torch.float32, n=128, seconds=0.05)
    # 2 * 128^3 FLOPs take more than a nanosecond and less than a second on any CPU
    assert 4.2e6 < rate < 4.2e15


def test_probe_onednn_candidate_computes_the_same_product():
    """The peak probe also times oneDNN (what the cpp backend's products use): that candidate must
    compute a @ b, not a @ b.T, or the peak would be of another product."""
    mm = perf._onednn_matmul()
    if mm is None:  # a torch without oneDNN: the probe times torch.mm only
        assert not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise")
        return
    a, b = torch.randn(37, 50), torch.randn(50, 21)
    assert torch.allclose(mm(a, b), a @ b, atol=1e-5)
    assert "oneDNN" in perf._cpu_peak_key(torch.float32)


def test_training_reports_mfu_on_cpu_against_the_measured_peak(peak_cache, tmp_path):
    import json
    import os

    import barkgpt

    r = barkgpt.train(steps=10, log_every=5, eval_every=10, out=str(tmp_path / "run"), progress=False,
                      sample=False, backend="torch", log=lambda m: None)
    events = [json.loads(x) for x in open(os.path.join(r.out_dir, "metrics.jsonl"))]
    logged = [e for e in events if "tokens_per_sec" in e]
    assert logged and all("mfu" in e for e in logged)
    fpt = r.model.flops_per_token()
    for e in logged:
        assert e["mfu"] == pytest.approx(fpt * e["tokens_per_sec"] / 1.25e11, rel=1e-9)


def test_device_kind_cpu():
    assert perf.device_kind("cpu") == "cpu"
    assert perf.cpu_model()


def test_flop_and_byte_models():
    # attention: 4*B*H*T*T*D, halved when causal, bwd 2.5x fwd
    assert perf.attention_flops(2, 3, 8, 4, False, "fwd") == 4 * 2 * 3 * 8 * 8 * 4
    assert perf.attention_flops(2, 3, 8, 4, True, "fwd") == 2 * 2 * 3 * 8 * 8 * 4
    assert perf.attention_flops(2, 3, 8, 4, True, "fwd+bwd") == 3.5 * 2 * 2 * 3 * 8 * 8 * 4
    # layer_norm fwd, 10 rows x 4 cols fp32, fp32 params with bias:
    # x 160 B + y 160 B + w 16 + b 16 + mean/rstd 2*10*4 = 432
    assert perf.layer_norm_bytes(10, 4, 4, 4, "fwd") == 432
    # bwd: dy, x, dx 3*160 + w 16 + stats 80 + dw, db 32 = 608
    assert perf.layer_norm_bytes(10, 4, 4, 4, "bwd") == 608
    # embedding fwd, B=2 T=3 C=4 V=5 fp32, int64 ids: ids 48 + token rows 96 + pos rows 48 + out 96
    assert perf.embedding_bytes(2, 3, 4, 5, 4, 8, "fwd") == 288
    # bwd: dout 96 + ids 48 + token grad 5*4*4=80 + pos grad 48
    assert perf.embedding_bytes(2, 3, 4, 5, 4, 8, "bwd") == 272
