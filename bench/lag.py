"""`python -m bench.lag`: what lagging copies do to the device budget, with and without Rule 10.

A small GPT trains a few seeded steps under policy="offload" on the CPU emulation, its link
slowed to `--link-mbps` MB/s (a PCIe link shared with other ranks or NCCL behaves alike), once
without a device budget and once at `--budget` (a share of the peak the same run reaches with
the link at full speed: above what the offload policy needs, below what lagging copies pile up).
Per run it prints the measured saved-activation peak, the budget, the copies the runtime waited
for and the time it waited, the step time, and whether the gradients equal a plain run's. Exit
status 1 if gradients differ or the budgeted run's peak passes the budget by more than one
saved tensor (a save is counted once its op has allocated it).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from offload import EmulatedBackend, HybridCheckpointer

from .gpt import GPT, GPTConfig, make_batch

MODEL = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
BATCH = 4
MIN_OFFLOAD = 16 * 1024  # this model's activations are 64-512 KiB


def run(budget: int | None, bytes_per_s: float | None, steps: int) -> dict:
    """`steps` seeded steps on one batch (no optimizer: every step's gradients are alike)."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    hc = None if bytes_per_s == 0 else HybridCheckpointer(
        model, policy="offload", backend=EmulatedBackend(bytes_per_s=bytes_per_s),
        min_offload_bytes=MIN_OFFLOAD, device_budget=budget)
    idx, tgt = make_batch(MODEL, BATCH)
    grads, times = None, []
    for _ in range(steps):
        start = time.perf_counter()
        torch.manual_seed(1000)
        if hc is None:
            _, loss = model(idx, tgt)
        else:
            with hc:
                _, loss = model(idx, tgt)
        loss.backward()
        times.append(time.perf_counter() - start)
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    out = {"grads": grads, "step_s": sorted(times)[len(times) // 2]}
    if hc is not None:
        report = hc.report()
        out.update(peak=report.saved_peak_bytes, waits=report.budget_waits, wait_s=report.budget_wait_s)
        hc.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lag", description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-mbps", type=float, default=20.0, help="the slowed link, MB/s (default 20)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="the budget as a share of the peak lagging copies reach without one (default 0.5)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.link_mbps <= 0 or not 0 < args.budget <= 1 or args.steps < 1:
        parser.error("--link-mbps > 0, 0 < --budget <= 1 and --steps >= 1")
    slow = args.link_mbps * 1e6
    plain = run(None, 0, 1)
    fast = run(None, None, args.steps)
    lagging = run(None, slow, args.steps)
    budget = max(int(lagging["peak"] * args.budget), fast["peak"] + (1 << 20))
    held = run(budget, slow, args.steps)
    one_tensor = MODEL.n_embd * 4 * MODEL.block_size * BATCH * 4  # the MLP's hidden layer
    print(f"offload policy, GPT {MODEL.n_layer}x{MODEL.n_embd}, batch {BATCH}x{MODEL.block_size}; "
          f"budget {budget / 2**20:.2f} MiB")
    print(f"{'run':<30} {'peak MiB':>9} {'waits':>6} {'waited ms':>10} {'step ms':>8}  gradients")
    ok = True
    for name, r in (("link at full speed", fast), (f"link at {args.link_mbps:g} MB/s", lagging),
                    (f"link at {args.link_mbps:g} MB/s, budget", held)):
        same = all(torch.equal(a, b) for a, b in zip(plain["grads"], r["grads"]))
        ok &= same
        print(f"{name:<30} {r['peak'] / 2**20:9.2f} {r['waits']:6d} {r['wait_s'] * 1e3:10.1f} "
              f"{r['step_s'] * 1e3:8.1f}  {'bitwise equal to plain' if same else 'DIFFER'}")
    if held["peak"] > budget + one_tensor:
        print(f"the budgeted run's peak passed the budget by {(held['peak'] - budget) / 2**10:.0f} KiB")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
