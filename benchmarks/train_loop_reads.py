"""What reading the loss back every step costs the training loop (issue #19 item 4).

Trains the same run twice in one process: as ``barkgpt train`` does (loss and grad norm read at
log/eval/save boundaries only), and with an ``on_step`` callback, which makes the loop read them
after every step, as it did before. Prints steps/s of each and their ratio (same run, so the
ratio is what to compare). Meant for a GPU, where each read waits for the device; on a CPU the
two should be level.

    python benchmarks/train_loop_reads.py --device cuda --preset bark --steps 300
"""

import argparse
import tempfile
import time

import barkgpt


def steps_per_sec(device, preset, steps, batch_size, read_every_step):
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        barkgpt.train(preset=preset, steps=steps, batch_size=batch_size, device=device, out=d + "/run",
                      eval_every=steps, save_every=0, log_every=100, progress=False, sample=False,
                      log=lambda m: None, on_step=(lambda s, l: None) if read_every_step else None)
        return steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="bark")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    steps_per_sec(a.device, a.preset, 20, a.batch_size, False)  # warm-up: kernels, allocator
    deferred, every = [], []
    for _ in range(a.repeats):  # interleaved, so drifts of the machine hit both alike
        deferred.append(steps_per_sec(a.device, a.preset, a.steps, a.batch_size, False))
        every.append(steps_per_sec(a.device, a.preset, a.steps, a.batch_size, True))
    best_d, best_e = max(deferred), max(every)
    print(f"{a.preset} on {a.device}, batch {a.batch_size}: reads at boundaries {best_d:.1f} steps/s, "
          f"every step {best_e:.1f} steps/s, ratio {best_d / best_e:.3f}")


if __name__ == "__main__":
    main()
