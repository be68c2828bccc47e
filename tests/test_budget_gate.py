"""Rule 10: when copies lag the link a plan counted on, the forward (and backward's prefetch)
waits for the oldest copies, so the saved bytes on the device hold the device budget."""
import weakref

import pytest
import torch

from offload import Action, EmulatedBackend, HybridCheckpointer, RegionSite
from offload.core.gate import BudgetGate
from offload.transfer.hostpool import MIN_SLAB, HostPool

from .conftest import MIN_OFFLOAD, assert_bitwise, cuda_or_skip, make_backend, settle, tiny_gpt, train

SLOW_LINK = 20e6  # bytes/s: the tiny GPT offloads ~9 MiB a step, ~0.5 s of copying
LAG_S = 0.01  # on CUDA, a spin this long before each copy (~46 a step) makes the link lag alike
BUDGET = 7 << 20  # above the offload policy's own peak (~6 MiB), below what lagging copies pile up (~14.5)
ONE_TENSOR = 512 << 10  # a save is counted once allocated: the peak may pass the budget by one


def run_offload(budget, steps=3, bytes_per_s=SLOW_LINK, device=torch.device("cpu")):
    model = tiny_gpt(device)
    backend = make_backend(device, LAG_S) if device.type == "cuda" else EmulatedBackend(bytes_per_s=bytes_per_s)
    hc = HybridCheckpointer(model, policy="offload", backend=backend,
                            min_offload_bytes=MIN_OFFLOAD, device_budget=budget)
    peaks, waits = [], []
    losses, grads = [], []
    for s in range(steps):
        out = train(model, hc, steps=1)  # one step at a time: each step's report
        losses += out[0]
        grads += out[1]
        report = hc.report()
        peaks.append(report.saved_peak_bytes)
        waits.append(report.budget_waits)
    return hc, (losses, grads), peaks, waits, report


def test_lagging_copies_hold_the_device_budget_and_change_no_gradient(device):
    plain = train(tiny_gpt(device), None, steps=1)
    hc, got, peaks, waits, report = run_offload(BUDGET, device=device)
    for s in range(3):
        assert_bitwise(plain, ([got[0][s]], [got[1][s]]))  # every step's batch is seed 0
        assert peaks[s] <= BUDGET + ONE_TENSOR, f"step {s}: saved peak {peaks[s]} over budget {BUDGET}"
        assert waits[s] > 0, f"step {s}: the forward never waited, yet copies lag"
    assert report.offloaded_bytes > BUDGET  # the budget was only held because copies were waited for
    assert "waited on lagging copies" in str(report)
    settle(hc)
    assert hc.host_pool.in_use == 0


def test_without_a_budget_lagging_copies_pile_up(device):
    """The control: no device budget, no waits, and the saved bytes pass what the budget held."""
    _, _, peaks, waits, _ = run_offload(None, steps=1, device=device)
    assert waits == [0]
    assert peaks[0] > BUDGET + 2 * ONE_TENSOR


def test_a_fast_link_never_waits():
    _, _, peaks, waits, _ = run_offload(BUDGET, steps=3, bytes_per_s=None)
    assert waits == [0, 0, 0]
    assert max(peaks) <= BUDGET


def test_auto_holds_its_budget_when_the_link_slows_after_planning():
    model = tiny_gpt()
    backend = EmulatedBackend()
    budget = 5 << 20
    hc = HybridCheckpointer(model, policy="auto", backend=backend, min_offload_bytes=MIN_OFFLOAD,
                            device_budget=budget, host_budget="64MiB", granularity="block")
    train(model, hc, steps=3)  # profiled and planned on the link as measured
    plan = hc.plan
    assert plan is not None and plan.offload_ids, "the test needs a plan that offloads"
    backend._bytes_per_s = SLOW_LINK  # then the link slows down (another rank, another process)
    plain = train(tiny_gpt(), None, steps=2)
    model.zero_grad(set_to_none=True)
    got = train(model, hc, steps=2)
    report = hc.report()
    assert report.budget_waits > 0
    assert report.saved_peak_bytes <= budget + ONE_TENSOR
    # the weights did not change (no optimizer), so the same batches give the same gradients
    assert_bitwise(plain, got)


class _Event:
    def __init__(self, name, log):
        self.name, self.log, self.done = name, log, False


class _Backend:
    """Copies finish only when waited for, and each frees the bytes it held."""

    def __init__(self, held: dict):
        self.held, self.log = held, []

    def query(self, ev):
        return ev.done

    def synchronize(self, ev):
        ev.done = True
        self.log.append(ev.name)
        self.held.pop(ev.name, None)

    def poll(self):
        pass


def test_gate_waits_for_the_oldest_copies_only_until_under_the_limit():
    held = {"a": 30, "b": 30, "c": 30}
    backend = _Backend(held)
    gate = BudgetGate(backend)
    events = {n: _Event(n, backend.log) for n in held}
    for ev in events.values():
        gate.issued(ev)
    kept = 20
    waits, _ = gate.hold(lambda: kept + sum(held.values()), limit=60)
    assert backend.log == ["a", "b"] and waits == 2  # 110 -> 80 -> 50: oldest first, then stop
    assert gate.running
    waits, _ = gate.hold(lambda: kept + sum(held.values()), limit=10)  # cannot be met: drains, stops
    assert backend.log == ["a", "b", "c"] and waits == 1 and not gate.running


def test_gate_forgets_finished_copies_as_new_ones_come():
    backend = _Backend({})
    gate = BudgetGate(backend)
    for i in range(1000):
        ev = _Event(i, backend.log)
        gate.issued(ev)
        ev.done = True
    assert len(gate._running) == 1  # bounded by the copies still running, not by the step


def test_emulated_synchronize_means_the_backend_let_go_of_the_source():
    backend = EmulatedBackend(d2h_delay_s=0.2)
    pool = HostPool(backend, budget=4 * MIN_SLAB, slab_bytes=MIN_SLAB)
    src = torch.randn(100_000).view(torch.uint8)
    blocks = pool.alloc(src.numel())
    ev = backend.d2h(src, [b.view for b in blocks])
    backend.release(src, after=ev)
    alive = weakref.ref(src.untyped_storage())
    del src
    assert alive() is not None  # the copy still reads it
    backend.synchronize(ev)
    assert alive() is None  # gone by the time the wait returns, not at some later callback
    backend.close()


@pytest.mark.cuda
def test_cuda_source_is_held_until_its_copy_ran_then_freed_at_poll():
    device = cuda_or_skip()
    from offload.transfer.cuda import CudaBackend
    backend = CudaBackend(device, d2h_delay_cycles=200_000_000)  # ~0.1 s spin before the copy
    pool = HostPool(backend, budget=64 * MIN_SLAB, slab_bytes=16 * MIN_SLAB)
    src = torch.randn(4 << 20, device=device).view(torch.uint8)
    nbytes = src.numel()
    blocks = pool.alloc(nbytes)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    ev = backend.d2h(src, [b.view for b in blocks])
    backend.release(src, after=ev)
    del src
    assert torch.cuda.memory_allocated(device) == before  # still held: the copy has not run
    backend.synchronize(ev)
    assert torch.cuda.memory_allocated(device) == before - nbytes  # let go once it ran


def test_a_budget_the_kept_bytes_alone_exceed_is_not_waited_for_and_said_once(recwarn):
    """Waiting frees only what running copies hold: once the bytes kept on the device exceed the
    budget by themselves, the forward would run in lockstep with its copies for nothing. It does
    not wait, and says why, once."""
    def first_block_kept(site):  # block 0 kept (~0.8 MiB), the later blocks offloaded
        if isinstance(site, RegionSite):
            return Action.KEEP if site.index == 0 else Action.OFFLOAD
        return None

    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=first_block_kept, backend=EmulatedBackend(bytes_per_s=SLOW_LINK),
                            min_offload_bytes=MIN_OFFLOAD, device_budget=256 << 10)
    for _ in range(2):
        train(model, hc, steps=1)
        report = hc.report()
        assert report.offloaded_bytes > 0 and report.budget_waits == 0
    said = [w for w in recwarn.list if "waiting for copies cannot hold it" in str(w.message)]
    assert len(said) == 1


def test_auto_waits_on_the_limit_its_plan_was_made_under():
    """An infeasible budget: auto's plan runs anyway at its own peak, and that peak, not the
    budget it cannot meet, is what lagging copies are waited for against."""
    model = tiny_gpt()
    budget = 1 << 20
    hc = HybridCheckpointer(model, policy="auto", backend=EmulatedBackend(), min_offload_bytes=MIN_OFFLOAD,
                            device_budget=budget, host_budget="64MiB", granularity="block")
    with pytest.warns(Warning, match="infeasible"):
        train(model, hc, steps=3)
    plan = hc.plan
    assert plan is not None and plan.predicted_peak_bytes > budget
    assert hc._runtime.device_limit() == plan.predicted_peak_bytes
