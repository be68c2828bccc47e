"""The contenders: ways of training the same model, each applied to its own copy of it.

A `Contender` says how a model copy is prepared (blocks wrapped in torch checkpointing, an
`offload.HybridCheckpointer` attached, ...) and returns an `Attached`: the copy plus the context its
forward runs in. The measuring code (bench/measure.py) treats every `Attached` alike.
"""
from __future__ import annotations

import abc
import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import offload

# Families, for the plot and the tables: torch's own anchors, our fixed policies, our auto sweep.
BASELINE, OURS, AUTO = "baseline", "ours", "auto"


@dataclass
class Attached:
    """A prepared model copy. `params` are its parameters in the order of the original model's
    `parameters()` (wrapping blocks does not change them), for comparing gradients."""

    model: nn.Module
    params: list[nn.Parameter]
    context: Callable[[], ContextManager] = contextlib.nullcontext
    runtime: offload.HybridCheckpointer | None = None

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The forward pass under this contender's context; returns the loss."""
        with self.context():
            _, loss = self.model(idx, targets)
        return loss

    def report(self) -> dict:
        """The runtime's report of the last step as a dict ({} for contenders without one)."""
        return self.runtime.report().to_dict() if self.runtime is not None else {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def close(self) -> None:
        """Stop the runtime's copy threads (the emulation's workers); the copy is unusable after."""
        if self.runtime is not None:
            self.runtime.backend.close()


class Contender(abc.ABC):
    """One way to train. `attach` prepares a model copy the caller owns (it may modify it)."""

    name: str
    family: str
    settle_steps: int = 0  # steps before it reaches its steady state (beyond the usual warm-up)

    @abc.abstractmethod
    def attach(self, model: nn.Module, blocks: str) -> Attached:
        """Prepare `model` (whose repeated blocks are the nn.ModuleList named `blocks`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Plain(Contender):
    """No checkpointing: every saved activation stays on the device."""

    name, family = "plain", BASELINE

    def attach(self, model: nn.Module, blocks: str) -> Attached:
        return Attached(model, list(model.parameters()))


class CheckpointedBlock(nn.Module):
    """`torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)` around one block."""

    def __init__(self, block: nn.Module, context_fn: Callable | None = None):
        super().__init__()
        self.block = block
        self.context_fn = context_fn

    def forward(self, *args, **kwargs):
        extra = {} if self.context_fn is None else {"context_fn": self.context_fn}
        return checkpoint(self.block, *args, use_reentrant=False, **extra, **kwargs)


def wrap_blocks(model: nn.Module, blocks: str, context_fn: Callable | None = None) -> None:
    """Replace every entry of the ModuleList `blocks` of `model` by a `CheckpointedBlock`."""
    container = model.get_submodule(blocks)
    for i, block in enumerate(list(container)):
        container[i] = CheckpointedBlock(block, context_fn)


class TorchCheckpoint(Contender):
    """Full activation checkpointing per block (torch.utils.checkpoint, non-reentrant)."""

    name, family = "checkpoint", BASELINE

    def attach(self, model: nn.Module, blocks: str) -> Attached:
        params = list(model.parameters())
        wrap_blocks(model, blocks)
        return Attached(model, params)


def _aten_packets(*names: str) -> frozenset:
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


# Matmul-like ops whose outputs selective checkpointing keeps (Korthikanti et al. 2022: the costly
# ops are saved, the cheap pointwise ones are recomputed).
SAVED_BY_SELECTIVE = _aten_packets(
    "mm", "addmm", "bmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: save the outputs of matmuls and attention, recompute the rest."""
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpoint(Contender):
    """PyTorch selective activation checkpointing per block, saving matmul outputs."""

    name, family = "selective", BASELINE

    def attach(self, model: nn.Module, blocks: str) -> Attached:
        params = list(model.parameters())
        wrap_blocks(model, blocks, functools.partial(create_selective_checkpoint_contexts, save_matmuls))
        return Attached(model, params)


class SaveOnCpu(Contender):
    """`torch.autograd.graph.save_on_cpu` around the forward: every saved tensor (parameters
    too) copied to host memory synchronously, pinned when the model is on CUDA."""

    name, family = "save_on_cpu", BASELINE

    def attach(self, model: nn.Module, blocks: str) -> Attached:
        pin = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
        return Attached(model, list(model.parameters()),
                        context=lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))


@dataclass(frozen=True)
class RuntimeSettings:
    """What every `offload.HybridCheckpointer` contender is given (bytes)."""

    min_offload_bytes: int
    host_budget: str | int


class Hybrid(Contender):
    """Our runtime with a fixed policy ("keep", "offload", "recompute")."""

    family = OURS

    def __init__(self, policy: str, settings: RuntimeSettings):
        self.policy = policy
        self.settings = settings
        self.name = policy

    def _runtime_kwargs(self) -> dict:
        return dict(policy=self.policy, host_budget=self.settings.host_budget,
                    min_offload_bytes=self.settings.min_offload_bytes)

    def attach(self, model: nn.Module, blocks: str) -> Attached:
        hc = offload.HybridCheckpointer(model, **self._runtime_kwargs())
        return Attached(model, list(model.parameters()), context=lambda: hc, runtime=hc)


class HybridAuto(Hybrid):
    """Our runtime with policy="auto" under a device budget (bytes): "auto@30%" at op level (the
    default), "auto-block@30%" with whole blocks only (granularity="block")."""

    family = AUTO
    # policy="auto" profiles its first two forwards and plans before the third, measuring the host
    # link inside it (offload/auto/policy.py): from the fourth step on the plan runs undisturbed.
    settle_steps = 3

    def __init__(self, device_budget: int, label: str, settings: RuntimeSettings, granularity: str = "op"):
        super().__init__("auto", settings)
        self.device_budget = device_budget
        self.granularity = granularity
        self.name = f"auto@{label}" if granularity == "op" else f"auto-{granularity}@{label}"

    def _runtime_kwargs(self) -> dict:
        return dict(super()._runtime_kwargs(), device_budget=self.device_budget, granularity=self.granularity)


def baselines() -> list[Contender]:
    """torch's anchors, in table order."""
    return [Plain(), TorchCheckpoint(), SelectiveCheckpoint(), SaveOnCpu()]


def fixed_policies(settings: RuntimeSettings) -> list[Contender]:
    """Our runtime under each fixed policy."""
    return [Hybrid(p, settings) for p in ("keep", "offload", "recompute")]


# Errors that mean "policy='auto' is not there yet", as opposed to a bug in it.
AUTO_MISSING = (NotImplementedError, ImportError)
