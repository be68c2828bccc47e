"""Our operations as named ranges in PyTorch's profiler and, on CUDA, in NVTX (Nsight)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def op_range(name: str, cuda: bool):
    """`torch.profiler.record_function(name)`, plus an NVTX range when `cuda`."""
    with torch.profiler.record_function(name):
        if cuda:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.nvtx.range_pop()
