"""The shape fit (scheduler/shapes.py): a new (batch, sequence) predicted from the shapes seen."""
import pytest

from scheduler import Profile, SegmentRecord, TensorRecord, plan, plan_uniform
from scheduler.hardware import get_hardware
from scheduler.plan import Action
from scheduler.shapes import ShapeFit, exact_models, nnls, smooth_model
from scheduler.synth import offload_threshold, transformer_profile


def toy(b: int, s: int, extra: int = 0, times: bool = True) -> Profile:
    """Two segments: an activation (b*s*64), attention probabilities (b*s^2*4), a causal mask
    (s^2), a weight (4096, constant) and a tensor of two terms (1000 + 8*b*s) when `extra`;
    the block's backward working set is 3000 + twice its saved bytes."""
    fwd = 1e-3 + 2e-6 * b * s if times else 0.0
    working = 3000 + 2 * (64 * b * s + 4 * b * s * s + s * s)  # weight gradients + twice the saved bytes
    segs = (SegmentRecord(0, "block", fwd, 2 * fwd, True, 16 * b * s, working),
            SegmentRecord(1, "head", fwd / 2, fwd, False, 0, 0))
    tens = [TensorRecord(0, 0, 64 * b * s, True), TensorRecord(1, 0, 4 * b * s * s, True),
            TensorRecord(2, 0, s * s, False), TensorRecord(3, 1, 4096, False)]
    if extra:
        tens.append(TensorRecord(4, 1, 1000 + 8 * b * s, True))
    return Profile(segs, tuple(tens), bw_d2h=1e9, bw_h2d=1e9)


def fitted(*shapes, extra=0):
    fit = ShapeFit()
    for b, s in shapes:
        assert fit.add(b, s, toy(b, s, extra), timed=True)
    return fit


def test_two_shapes_pin_down_one_term_bytes_the_quadratic_one_included():
    fit = fitted((2, 64), (2, 96))
    assert fit.predict(2, 100) is not None and fit.shapes == fit.timed_shapes == 2
    for s in (8, 80, 512):  # inside and far outside the shapes seen: exact
        got, want = fit.predict(2, s, signature="x"), toy(2, s)
        assert [t.nbytes for t in got.tensors] == [t.nbytes for t in want.tensors]
        assert [g.input_bytes for g in got.segments] == [w.input_bytes for w in want.segments]
        assert [g.backward_working_set_bytes for g in got.segments] == [w.backward_working_set_bytes
                                                                         for w in want.segments]
        assert got.signature == "x" and got.meta["fit"] is True
        for g, w in zip(got.segments, want.segments):
            assert g.forward_s == pytest.approx(w.forward_s, rel=1e-9)
            assert g.backward_s == pytest.approx(w.backward_s, rel=1e-9)


def test_one_shape_predicts_nothing_and_a_new_batch_needs_a_second_batch_seen():
    assert ShapeFit().predict(2, 64) is None
    assert fitted((2, 64)).predict(2, 32) is None
    fit = fitted((2, 64), (2, 96))
    assert fit.predict(4, 64) is None  # b*s^2 and s^2 agree at b=2 only: not pinned down
    fit.add(4, 64, toy(4, 64), timed=False)  # an ordinary step at another batch size
    got = fit.predict(8, 200)
    assert [t.nbytes for t in got.tensors] == [t.nbytes for t in toy(8, 200).tensors]


def test_a_two_term_tensor_needs_three_shapes():
    assert fitted((1, 64), (1, 128), extra=1).predict(1, 256) is None
    fit = fitted((1, 64), (1, 128), (1, 32), extra=1)
    assert [t.nbytes for t in fit.predict(1, 256).tensors] == [t.nbytes for t in toy(1, 256, 1).tensors]


def test_a_seen_shape_gives_its_measured_bytes_and_offloadable_follows_the_threshold():
    fit = fitted((2, 64), (2, 96))
    got = fit.predict(2, 64, min_offload_bytes=10**9)
    assert got.tensors == toy(2, 64).tensors  # measured there: flags as measured too
    small = fit.predict(2, 4, min_offload_bytes=2000)  # 64*2*4 = 512 bytes: below the threshold
    assert [t.offloadable for t in small.tensors] == [False, False, False, False]
    big = fit.predict(2, 4096, min_offload_bytes=2000)
    assert [t.offloadable for t in big.tensors] == [True, True, False, False]  # the mask never was


def test_bytes_that_no_model_reproduces_are_not_predicted():
    fit = ShapeFit()
    for s, n in ((16, 1000), (32, 1000), (48, 3000), (64, 3000)):  # padded to a multiple of 32
        p = toy(1, s)
        fit.add(1, s, Profile(p.segments, p.tensors[:3] + (TensorRecord(3, 1, n, False),),
                              p.bw_d2h, p.bw_h2d), timed=True)
    assert fit.predict(1, 80) is None


def test_another_structure_starts_the_fit_again_and_shapes_are_bounded():
    fit = fitted((2, 64), (2, 96))
    assert not fit.add(2, 32, toy(2, 32, extra=1), timed=True)
    assert fit.shapes == 1 and fit.predict(2, 48) is None
    small = ShapeFit(max_shapes=3)
    for s in (8, 16, 24, 32, 40):
        small.add(1, s, toy(1, s), timed=True)
    assert small.shapes == 3


def test_exact_and_smooth_models():
    models = exact_models([(1, 10, 300.0), (1, 20, 1200.0)])  # 3*s^2 (b=1: s^2 and b*s^2 tie)
    assert {m.terms for m in models} == {("s2",), ("bs2",)}
    assert all(m(1, 30) == pytest.approx(2700) for m in models)
    assert len(exact_models([(1, 10, 300.0), (1, 20, 1200.0)][:1])) == 0  # one point: no model
    t = smooth_model([(1, 10, 5.0), (1, 20, 4.0), (1, 30, 3.0)])  # noise falling with s
    assert all(c >= 0 for c in t.coefs) and t(1, 1000) >= 0
    assert nnls([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]], [3.0, 2.0, 1.0]) == pytest.approx((2.0, 0.0))
    assert nnls([[1.0, 1.0], [1.0, 2.0]], [3.0, 5.0]) == pytest.approx((1.0, 2.0))


def test_a_llama_profile_at_a_new_length_is_the_profile_measured_there():
    """Llama-3-8B, eager attention (quadratic bytes and times): fitted at 1k, 2k and 3k tokens,
    the 8k profile's bytes and offloadable flags are exact, its times within 1e-9, and it
    gives the same plan."""
    hw = get_hardware("h100-pcie")
    fit = ShapeFit()
    for s in (1024, 2048, 3072):
        fit.add(1, s, transformer_profile("llama3-8b", hw, seq=s, flash=False), timed=True)
    want = transformer_profile("llama3-8b", hw, seq=8192, flash=False)
    got = fit.predict(1, 8192, signature=want.signature, min_offload_bytes=offload_threshold(hw))
    assert got.tensors == want.tensors
    for g, w in zip(got.segments, want.segments):
        assert g.forward_s == pytest.approx(w.forward_s, rel=1e-6)
    budget = plan_uniform(want, Action.KEEP).predicted_peak_bytes // 3
    a, b = plan(got, budget, None), plan(want, budget, None)
    assert (a.segments, a.offload_ids) == (b.segments, b.offload_ids)
