"""`python -m bench`: the embedded GPT trained a few steps under each policy, with reports."""
import logging

import torch

from bench.gpt import GPT, GPTConfig, make_batch
from offload import HybridCheckpointer, PeakMemory

log = logging.getLogger("bench")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.1)
    for policy in ("keep", "offload", "recompute"):
        torch.manual_seed(0)
        model = GPT(cfg)
        hc = HybridCheckpointer(model, policy=policy, host_budget="1GiB", min_offload_bytes=64 << 10)
        for step in range(3):
            idx, tgt = make_batch(cfg, 8, seed=step)
            with PeakMemory("cpu") as pm:
                with hc:
                    _, loss = model(idx, tgt)
                loss.backward()
            model.zero_grad(set_to_none=True)
        log.info("== policy=%s  loss=%.4f  peak activation memory=%.1f MiB\n%s\n",
                 policy, loss.item(), pm.peak_bytes / 2**20, hc.report())


if __name__ == "__main__":
    main()
