"""python benchmarks/lce_gpt2_memory.py

Issue #15: peak memory of one gpt2-preset training step (fwd+bwd, B=2, T=1024, fp32, cpp
backend), fused head + loss vs the plain head + F.cross_entropy (return_logits=True), each in a
fresh process: VmHWM after the step minus VmRSS before it (after a warm-up step, peak reset via
/proc/self/clear_refs)."""
import subprocess, sys
code = r'''
import ctypes, sys, torch, barkgpt
def rss(k):
    for ln in open("/proc/self/status"):
        if ln.startswith(k): return int(ln.split()[1]) * 1024
m = barkgpt.BarkGPT(barkgpt.GPTConfig.preset("gpt2"), backend="cpp")
x = torch.randint(0, 50257, (2, 1024)); y = torch.randint(0, 50257, (2, 1024))
fused = sys.argv[1] == "fused"
def step():
    out = m(x, y, return_logits=not fused)
    out[1].backward()
step()
for p in m.parameters(): p.grad = None
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS")
step()
print(f"{(rss('VmHWM') - before) / 2**20:.0f}")
'''
res = {}
for mode in ("fused", "plain"):
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-2000:]); sys.exit(1)
    res[mode] = float(out.stdout.split()[-1])
logits = 2 * 1024 * 50304 * 4 / 2**20
print(f"gpt2 preset, B=2 T=1024 fp32, peak RSS growth of one fwd+bwd: fused {res['fused']:.0f} MiB, "
      f"plain head + F.cross_entropy {res['plain']:.0f} MiB, saved {res['plain'] - res['fused']:.0f} MiB "
      f"(fp32 logits: {logits:.0f} MiB)")
