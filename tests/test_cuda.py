"""CUDA-only checks of the stream rules (Rule 2) and of real device memory. They skip at run time
without a GPU; run them where one is lent: `python -m pytest tests/test_cuda.py -m cuda`."""
import dataclasses
import gc

import pytest
import torch

from offload import HybridCheckpointer, PeakMemory
from offload.transfer.cuda import CudaBackend
from bench.gpt import GPTConfig, make_batch
from bench.gpucheck.race import COMPUTE_DELAY_CYCLES, ComputeDelay, SkipsComputeWait

from .conftest import assert_bitwise, cuda_or_skip, settle, tiny_gpt, train, under

pytestmark = pytest.mark.cuda

BIG = GPTConfig(vocab_size=1024, block_size=256, n_layer=6, n_head=8, n_embd=512, dropout=0.0)
BIG_DROPOUT = dataclasses.replace(BIG, dropout=0.1)  # a replay must redraw the same masks


def test_delayed_side_streams_cannot_corrupt_results():
    dev = cuda_or_skip()
    for policy, cfg in (("offload", BIG), ("recompute", BIG_DROPOUT)):
        ref = train(tiny_gpt(dev, cfg), None, batch=8)  # plain, under the same seeds
        model = tiny_gpt(dev, cfg)
        backend = CudaBackend(dev, d2h_delay_cycles=5_000_000, h2d_delay_cycles=5_000_000)
        hc = HybridCheckpointer(model, policy=policy, backend=backend, host_budget="2GiB")
        assert_bitwise(ref, train(model, hc, batch=8))
        if policy == "offload":
            assert hc.stats.offloaded_bytes > 0
        else:
            assert hc.stats.recomputed_bytes > 0
        settle(hc)
        assert hc.host_pool.in_use == 0


def _train_with_compute_delay(dev, policy=None, backend=None):
    """Seeded steps of the dropout GPT with the compute stream spinning before every Linear (the
    producers of the offloaded tensors) and before each of their output gradients."""
    model = tiny_gpt(dev, BIG_DROPOUT)
    hc = None if policy is None else HybridCheckpointer(model, policy=policy, backend=backend, host_budget="2GiB")
    with ComputeDelay(model, COMPUTE_DELAY_CYCLES):
        return train(model, hc, batch=8), hc


def test_delayed_compute_stream_cannot_corrupt_results():
    """Rule 2: a D2H runs after the compute stream's queued work, a reload's destination after
    the work queued before its allocation. With the compute stream running late, a copy ordered
    only on the host would read bytes not yet written or overwrite bytes still in use."""
    dev = cuda_or_skip()
    ref, _ = _train_with_compute_delay(dev)
    for policy in ("offload", "recompute"):
        got, hc = _train_with_compute_delay(dev, policy, CudaBackend(dev))
        assert_bitwise(ref, got)
        assert (hc.stats.offloaded_bytes if policy == "offload" else hc.stats.recomputed_bytes) > 0


def test_compute_delay_catches_a_d2h_that_skips_the_compute_wait():
    """The test above can fail: the same delays with a backend whose D2H does not wait for the
    compute stream give different gradients."""
    dev = cuda_or_skip()
    ref, _ = _train_with_compute_delay(dev)
    got, hc = _train_with_compute_delay(dev, "offload", SkipsComputeWait(dev))
    assert hc.stats.offloaded_bytes > 0
    with pytest.raises(AssertionError):
        assert_bitwise(ref, got)


def test_source_reuse_is_guarded_until_its_copy_ran():
    """Drop every reference to the source right after queueing a slow D2H, then allocate and
    overwrite: unless the backend held the source until its copy ran, the allocator would hand
    the same block out at once."""
    dev = cuda_or_skip()
    backend = CudaBackend(dev, d2h_delay_cycles=50_000_000)
    host = backend.alloc_host(1 << 24)
    src = torch.full((1 << 22,), 3.0, device=dev)
    ev = backend.d2h(src.view(torch.uint8), [host])
    backend.release(src.view(torch.uint8), after=ev)
    del src
    junk = torch.empty((1 << 22,), device=dev).fill_(-1.0)
    backend.synchronize(ev)
    assert torch.equal(host.view(torch.float32), torch.full((1 << 22,), 3.0))
    del junk


def test_offload_moves_memory_from_device_to_host():
    """At the end of forward, device bytes with offload + host bytes == device bytes without it;
    over the whole step the peak is lower."""
    dev = cuda_or_skip()
    held, peaks, moved = {}, {}, {}
    for policy in ("keep", "offload"):
        model = tiny_gpt(dev, BIG)
        hc = HybridCheckpointer(model, policy=policy, host_budget="4GiB")
        train(model, hc, steps=1, batch=16)
        idx, tgt = make_batch(BIG, 16, device=dev)
        gc.collect()  # nothing of an earlier run may be freed inside the measured forward
        with PeakMemory(dev) as pm:
            base = torch.cuda.memory_allocated(dev)
            with hc:
                logits, loss = model(idx, tgt)
            torch.cuda.synchronize(dev)
            hc.backend.poll()  # finished copies release their sources
            torch.empty(1, device=dev)  # lets the allocator reuse what was just freed
            held[policy] = torch.cuda.memory_allocated(dev) - base
            loss.backward()
        peaks[policy] = pm.peak_bytes
        moved[policy] = hc.stats.offloaded_bytes
        # The logits' graph reaches the parameters (and their gradients) through its
        # AccumulateGrad nodes: kept to the next run, they were freed inside its measured forward,
        # which read as ~170 MB more saved than moved on the H200.
        del logits, loss, model, hc
    assert moved["keep"] == 0 and moved["offload"] > 0
    saved = held["keep"] - held["offload"]
    assert abs(saved - moved["offload"]) <= 0.05 * moved["offload"], (held, moved)
    assert peaks["offload"] < peaks["keep"], peaks


def test_reloaded_gradients_equal_under_autocast_bf16():
    dev = cuda_or_skip()
    ref_model = tiny_gpt(dev, BIG)
    model = tiny_gpt(dev, BIG)
    hc = HybridCheckpointer(model, policy="offload", host_budget="2GiB")
    idx, tgt = make_batch(BIG, 8, device=dev)
    outs = []
    for m, h in ((ref_model, None), (model, hc)):
        torch.manual_seed(0)
        with torch.autocast("cuda", dtype=torch.bfloat16), under(h):
            loss = m(idx, tgt)[1]
        loss.backward()
        outs.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
