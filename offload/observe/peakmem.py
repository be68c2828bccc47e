"""Peak device memory of a stretch of code: what tests and the bench use to judge savings.

On CUDA: `torch.cuda.max_memory_allocated` above the level at entry. On the CPU (the emulation's
"device"): the torch profiler's memory events, summed in time order (DESIGN.md §6); host pool
slabs come from mmap, not torch's allocator, so only device-tier tensors are counted.
"""
from __future__ import annotations

import os

import torch

# Kineto (the profiler's backend) prints "USDT: ... profiler_start" and "... profiler_stop" to
# stderr on every profiler start and stop at its default log level; level 6 is above its USDT
# level (5) and silences them, and only them, since nothing lower is printed by default. Kineto
# reads the variable once, when the first profiler in the process starts; a user's own wins.
_KINETO_QUIET = ("KINETO_LOG_LEVEL", "6")


def quiet_kineto() -> None:
    """Silence Kineto's USDT lines before a profiler of ours starts (a value the user set wins)."""
    os.environ.setdefault(*_KINETO_QUIET)


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes` (peak above the entry level)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.end_bytes = 0  # allocated at exit minus allocated at entry
        self._prof = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            quiet_kineto()
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._base
            return
        self._prof.__exit__(*exc)
        events = []
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            size = getattr(node.extra_fields, "alloc_size", None)
            if size is not None and getattr(node.extra_fields, "device", None) is None or \
                    size is not None and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, size))
        level = peak = 0
        for _, size in sorted(events):
            level += size
            peak = max(peak, level)
        self.peak_bytes, self.end_bytes = peak, level
        self._prof = None
