"""Shared fixtures: the tiny GPT, backends (emulated always, CUDA when present), a training loop."""
from __future__ import annotations

import contextlib
import copy
import gc

import pytest
import torch

from bench.gpt import GPT, GPTConfig, make_batch
from offload import Action, EmulatedBackend, HybridCheckpointer, RegionSite

# Activations of this model are 64-256 KiB; the threshold below makes them cross it.
MIN_OFFLOAD = 16 * 1024
TINY = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1)


def mixed(site):
    """A callable policy: recompute even blocks, offload odd ones; outside the blocks offload
    tensors over 64 KiB; inside kept/offloaded blocks follow the block."""
    if isinstance(site, RegionSite):
        return Action.RECOMPUTE if site.index % 2 == 0 else Action.OFFLOAD
    if site.region is None:
        return Action.OFFLOAD if site.nbytes > 64 * 1024 else Action.KEEP
    return None


def cuda_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """The compute device for a test: the CPU (emulated backend) always, CUDA when present. The
    CUDA case carries the `cuda` marker, so `pytest -m cuda` runs it."""
    return cuda_or_skip() if request.param == "cuda" else torch.device("cpu")


def make_backend(device: torch.device, delay_s: float = 0.0):
    """A backend for `device`, with copies delayed to open race windows."""
    if device.type == "cuda":
        from offload.transfer.cuda import CudaBackend
        cycles = int(delay_s * 1e9)  # ~1 GHz: a rough cycles-per-second figure suffices here
        return CudaBackend(device, d2h_delay_cycles=cycles, h2d_delay_cycles=cycles)
    return EmulatedBackend(d2h_delay_s=delay_s, h2d_delay_s=delay_s)


def tiny_gpt(device="cpu", cfg: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def under(hc: HybridCheckpointer | None):
    """`with under(hc):` runs a forward under the runtime, or plain when `hc` is None."""
    return contextlib.nullcontext() if hc is None else hc


def train(model, hc: HybridCheckpointer | None, steps: int = 3, batch: int = 4, mode: str = "backward",
          reseed_between: bool = True):
    """Run `steps` seeded steps; return (losses, grads per step). `mode`: how backward is called."""
    losses, grads = [], []
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    device = params[0].device
    for s in range(steps):
        idx, tgt = make_batch(model.cfg, batch, seed=s, device=device)
        torch.manual_seed(1000 + s)
        with under(hc):
            _, loss = model(idx, tgt)
        if reseed_between:
            torch.manual_seed(7)  # a user reseeding between forward and backward must not matter
        if mode == "backward":
            loss.backward()
            g = [p.grad.clone() for p in params]
        elif mode == "grad":
            g = [x.clone() for x in torch.autograd.grad(loss, params)]
        elif mode == "inputs":
            loss.backward(inputs=params)
            g = [p.grad.clone() for p in params]
        else:
            raise ValueError(mode)
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
        grads.append(dict(zip(names, g)))
    return losses, grads


def assert_bitwise(ref, got) -> None:
    ref_losses, ref_grads = ref
    losses, grads = got
    for s, (a, b) in enumerate(zip(ref_losses, losses)):
        assert torch.equal(a, b), f"step {s}: loss {a.item()} != {b.item()}"
    for s, (ga, gb) in enumerate(zip(ref_grads, grads)):
        for name in ga:
            assert torch.equal(ga[name], gb[name]), f"step {s}: gradient of {name} differs"


@contextlib.contextmanager
def collector_off(off: bool = True):
    """The cyclic garbage collector paused (when `off`) and restored as it was: what a test then
    sees freed was freed by reference counts alone, as a leak-free runtime frees it."""
    was_enabled = gc.isenabled()
    if off:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle(hc: HybridCheckpointer) -> None:
    """Let every copy finish and every dead handle go, so pool figures are final."""
    gc.collect()
    drain = getattr(hc.backend, "drain", None)
    if drain:
        drain()
    elif hc.device.type == "cuda":
        torch.cuda.synchronize(hc.device)
        hc.backend.poll()  # let go of the sources of finished copies
    gc.collect()


@pytest.fixture
def clone():
    return copy.deepcopy


@pytest.fixture(scope="session", autouse=True)
def _freeze_what_collection_imported():
    """Collection imports torch, transformers, lightning, ...: some 400k objects that live to the
    end of the session, which every full gc.collect() (after each test below, in settle(), in
    the bench) walks again, about half a second each on 2 cores. gc.freeze() moves what is alive
    now to the permanent generation, which collections skip; everything a test creates is still
    collected as before."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _collect_after_each_test():
    """Checkpointers a test leaves alive are collected before the next test starts, so what they
    still run (policy="auto"'s working-set profiler after a lone warm-up step stops only at the
    next forward, at close(), or when the checkpointer dies) cannot reach into another test."""
    yield
    gc.collect()


def assert_same_training(ref, got, steps: int) -> None:
    """Two framework runs, each (losses per step, trained weights by name, ...), are bitwise equal."""
    assert len(ref[0]) == len(got[0]) == steps
    for s, (a, b) in enumerate(zip(ref[0], got[0])):
        assert torch.equal(a, b), f"step {s}: loss {a.item()} != {b.item()}"
    for name, w in ref[1].items():
        assert torch.equal(w, got[1][name]), f"trained weight {name} differs"


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every 2-rank case of tests/dist/worker.py (DDP, FSDP2, tensor parallelism, the 2-stage
    pipelines) in one torchrun launch, shared by tests/test_distributed.py and
    tests/test_pipeline.py: each launch costs torchrun and both ranks importing torch first.
    A case that raises is recorded by the worker and fails only the tests that read it."""
    from .test_distributed import launch
    return launch(tmp_path_factory.mktemp("dist2"), "ddp,fsdp2,tp,pp")
