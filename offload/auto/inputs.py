"""The model's inputs as policy="auto" keys its plans: a signature, a batch, a sequence, a family.

The signature (every input tensor's shape and dtype) names one plan. The batch b and sequence s
are the first two dimensions of the first input tensor of two or more dimensions (input ids,
embeddings); a model called with no such tensor has b = the first dimension (or 1) and s = 1.
The family is the signature with b and s written as letters: the signatures of one family
differ only in b and s, so `scheduler.shapes.ShapeFit` can fit them together (a dimension that
happens to equal b or s elsewhere at one shape only puts that shape in a family of its own,
which costs profiling steps, never a wrong fit: the fit checks each prediction's structure).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputShape:
    """One forward's inputs: the plan's key and the point the shape fit works at."""

    signature: str
    family: str
    batch: int
    seq: int


def input_shape(args: tuple, kwargs: dict) -> InputShape:
    """Read `InputShape` off the model's call arguments."""
    leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    signature = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in leaves)
    lead = next((t for t in leaves if t.dim() >= 2), None)
    if lead is not None:
        batch, seq = int(lead.shape[0]), int(lead.shape[1])
    else:
        batch, seq = (int(leaves[0].shape[0]) if leaves and leaves[0].dim() else 1), 1

    def letter(i: int, d: int) -> str:
        if i == 0 and d == batch:
            return "b"
        return "s" if d == seq and lead is not None else str(d)

    family = ";".join(f"({','.join(letter(i, d) for i, d in enumerate(t.shape))}):{t.dtype}" for t in leaves)
    return InputShape(signature, family, batch, seq)
