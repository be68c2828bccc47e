"""Layer 6: policy="auto" on variable sequence lengths: new shapes planned from the shape fit,
with no profiling step, and the first profile under the plan the budget allows."""
import contextlib

import pytest
import torch

from offload import EmulatedBackend, HybridCheckpointer, PeakMemory
from offload.auto.inputs import input_shape
from bench.gpt import make_batch

from .conftest import MIN_OFFLOAD, TINY, tiny_gpt

BATCH = 4
LENGTHS = (64, 48, 32, 56, 40, 24)  # the first two are profiled, the other four come from the fit


def steps(model, hc, lengths, per_shape=2, measure_from=0):
    """Train `per_shape` seeded steps per sequence length; per step (loss, grads, measured peak,
    report or None). Plain runs measure the first step's peak only (the profiler is slow); runs
    under `hc` the peaks from step `measure_from` on (on the CPU the peak is read with the
    profiler, and while it runs auto's working-set probe stands down)."""
    out = []
    for seq in lengths:
        for s in range(per_shape):
            idx, tgt = make_batch(TINY, BATCH, seed=s, seq=seq)
            torch.manual_seed(1000 + s)
            measure = len(out) >= measure_from if hc is not None else not out
            pm = PeakMemory("cpu") if measure else contextlib.nullcontext()
            with pm:
                with hc if hc is not None else torch.enable_grad():
                    _, loss = model(idx, tgt)
                loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()], getattr(pm, "peak_bytes", None),
                        hc.report() if hc is not None else None))
            model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module")
def plain():
    return steps(tiny_gpt(), None, LENGTHS)


def auto(model, budget, **kw):
    return HybridCheckpointer(model, policy="auto", device_budget=budget, host_budget="256MiB",
                              min_offload_bytes=MIN_OFFLOAD, backend=EmulatedBackend(), **kw)


def test_six_lengths_train_bitwise_with_two_profiled_and_four_from_the_fit(plain):
    budget = int(0.6 * plain[0][2])  # of keep's measured peak at the longest length: plans that fit
    model = tiny_gpt()
    hc = auto(model, budget)
    got = steps(model, hc, LENGTHS, measure_from=4)
    for i, ((la, ga, _, _), (lb, gb, _, _)) in enumerate(zip(plain, got)):
        assert torch.equal(la, lb), i
        assert all(torch.equal(x, y) for x, y in zip(ga, gb)), i
    shapes = [r.shapes for _, _, _, r in got]
    # two profiling steps for each of the first two lengths, none after: a counter, per step
    assert [s["profiling_steps"] for s in shapes] == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4]
    assert [s["plan_source"] for s in shapes[4:]] == ["fit"] * 8
    assert shapes[-1]["fitted_plans"] == 4 and shapes[-1]["profiled_shapes"] == 2
    # The fit's saved bytes for each unseen length, against the bytes its step saved. Stated
    # tolerance: 1% (on this model every storage's bytes are one exact term: 0 measured).
    assert all(abs(s["fit_error"]) <= 0.01 for s in shapes[4:])
    # The plans differ across lengths (the fit changes plans, never results), and the measured
    # peak of every fitted length stays within the budget
    assert len({r.predicted["mix"] + str(r.predicted["offloaded_bytes"]) for _, _, _, r in got[4:]}) > 1
    assert hc.plan.profile.has_working_sets  # measured on the profiling steps, fitted since
    # (the budget bounds activation memory, not the gradients PeakMemory also sees)
    assert all(r.saved_peak_bytes <= budget for _, _, _, r in got[4:]), [r.saved_peak_bytes for *_, r in got]
    assert not any("cannot be met" in n for _, _, _, r in got[4:] for n in r.predicted["notes"])
    text = str(got[-1][3])
    assert "4 (2 shape(s) profiled); 4 plan(s) from the shape fit" in text and "from the shape fit" in text


def test_first_profile_recomputes_when_keeps_peak_is_unknown_even_without_a_budget():
    """The default budget is free device memory, which keep's unknown peak may exceed: a first
    step run out of memory would be lost, so the first shape profiles under recompute."""
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="auto", host_budget="64MiB", min_offload_bytes=MIN_OFFLOAD)
    (_, _, _, r), = steps(model, hc, (64,), per_shape=1)
    assert r.shapes["profiling_steps"] == 1 and r.shapes["plan_source"] is None
    assert r.replays > 0 and r.recomputed_bytes > 0


def test_a_profile_under_a_budget_that_fits_keep_runs_no_recompute(plain):
    """The first length's keep peak is unknown: it profiles under full recompute. A shorter one
    is known to fit keep (bytes never shrink with the length): its profile runs no recompute."""
    model = tiny_gpt()
    hc = auto(model, 2 * plain[0][2])
    got = steps(model, hc, (64, 32))
    assert [r.shapes["profiling_steps"] for _, _, _, r in got] == [1, 2, 3, 4]
    first, second = [r for _, _, _, r in got[:2]], [r for _, _, _, r in got[2:]]
    assert all(r.replays > 0 for r in first)
    assert all((r.replays, r.recomputed_bytes) == (0, 0) for r in second)


def test_a_step_that_saves_other_bytes_than_predicted_corrects_the_fit(plain):
    model = tiny_gpt()
    hc = auto(model, plain[0][2] // 2)
    steps(model, hc, LENGTHS[:2])
    policy = hc._runtime.policy
    (fit,) = policy.fits.values()
    predict = fit.predict

    def wrong(batch, seq, **kw):  # a fit that has it wrong once: every storage twice as large
        fit.predict = predict
        p = predict(batch, seq, **kw)
        return type(p)(p.segments, tuple(t.__class__(t.id, t.segment, 2 * t.nbytes, t.offloadable,
                                                     t.last_segment) for t in p.tensors),
                       p.bw_d2h, p.bw_h2d, p.transfer_latency_s, p.signature, p.meta)

    fit.predict = wrong
    got = steps(model, hc, (32,))
    first, second = got[0][3].shapes, got[1][3].shapes
    assert first["plan_source"] == "fit" and first["fit_error"] == pytest.approx(-0.5)
    assert second["fit_error"] == 0 and second["fitted_plans"] == 2  # planned again, from measured bytes
    assert second["profiling_steps"] == 4


def test_input_shape_reads_batch_and_sequence():
    ids = torch.zeros(4, 48, dtype=torch.long)
    a = input_shape((ids,), {"labels": ids, "mask": torch.ones(4, 1, 48, 48)})
    b = input_shape((torch.zeros(2, 96, dtype=torch.long),), {"labels": torch.zeros(2, 96, dtype=torch.long),
                                                               "mask": torch.ones(2, 1, 96, 96)})
    assert (a.batch, a.seq, b.batch, b.seq) == (4, 48, 2, 96)
    assert a.family == b.family and a.signature != b.signature
    assert input_shape((), {}).family == "" and input_shape((torch.zeros(3),), {}).batch == 3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::offload.OffloadWarning")  # tiny Llama: the reserve outweighs the budget
def test_bench_shapes_parses_and_runs(capsys):
    from bench.shapes import default_shapes, main, parse_shapes
    assert parse_shapes("2x256, 4x64") == [(2, 256), (4, 64)]
    for bad in ("2x", "0x64", "", "2x3x4"):
        with pytest.raises(Exception, match="BATCHxSEQ"):
            parse_shapes(bad)
    assert default_shapes(2, 256)[:3] == [(2, 256), (2, 192), (2, 128)] and default_shapes(2, 256)[-1] == (4, 64)
    assert main(["--preset", "llama-tiny", "--shapes", "4x32,4x24,4x16", "--budget", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "profiling steps: 4 over 3 shapes (6 at 2 per shape before the fit: 2 saved)" in out
