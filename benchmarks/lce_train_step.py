"""python benchmarks/lce_train_step.py [ROUNDS]

Quiet-machine timing for issue #15: a training step (fwd+bwd+AdamW) of the 0.8M-parameter model
with GPT-2's vocabulary (n_embd 128, 4 layers, block 128, batch 4), barkgpt (cpp) vs the plain
PyTorch GPT with the same weights (benchmarks/_plain_gpt.py), eager; rounds interleaved."""
import os, sys, time, statistics
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import barkgpt
from _plain_gpt import plain_copy

cfg = barkgpt.GPTConfig.preset("small", vocab_size=50304)  # n_embd 128, 4 layers, block 128
torch.manual_seed(0)
m = barkgpt.BarkGPT(cfg, backend="cpp")
p = plain_copy(m)
print("params", m.num_params(), "non-emb", m.num_params(non_embedding=True))
x = torch.randint(0, 50304, (4, 128)); y = torch.randint(0, 50304, (4, 128))
om = m.configure_optimizers(0.1, 1e-3, device_type="cpu")
op = p.configure_optimizers(0.1, 1e-3, "cpu")

def step_b():
    _, loss = m(x, y); loss.backward(); om.step(); om.zero_grad(set_to_none=True)
def step_p():
    out = p(x, y)
    loss = out[1] if isinstance(out, tuple) else out
    loss.backward(); op.step(); op.zero_grad(set_to_none=True)
for _ in range(3):
    step_b(); step_p()
tb, tp = [], []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 15):
    t0 = time.perf_counter(); step_b(); tb.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); step_p(); tp.append(time.perf_counter() - t0)
b, pl = statistics.median(tb), statistics.median(tp)
print(f"0.8M model, V=50304, B=4 T=128, train step medians: barkgpt-cpp {1e3*b:.1f} ms, plain PyTorch {1e3*pl:.1f} ms -> {pl/b:.2f}x")
