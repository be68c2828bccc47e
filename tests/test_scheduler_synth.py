"""Hardware presets, the cost model, and the synthetic transformer profiles."""
import math

import pytest

from scheduler import PRESETS, Hardware, Profile, SegmentRecord, get_hardware
from scheduler import costmodel
from scheduler.synth import get_model, layer_flops, layer_records, transformer_profile

GB = 1e9


def test_presets():
    assert all(get_hardware(name).name == name for name in PRESETS)
    # The links within what DESIGN §5 cites: PCIe Gen5 x16 measures 50-56 GB/s per direction (63 in
    # theory), Gen4 half of that; NVLink-C2C on GH200 moves host-to-device ~2.4x faster.
    for name in ("h100-pcie", "h200"):
        hw = get_hardware(name)
        assert 50 * GB <= hw.bw_d2h == hw.bw_h2d <= 56 * GB
    a100 = get_hardware("a100-pcie")
    assert 0 < a100.bw_d2h == a100.bw_h2d <= 63 * GB / 2
    gh = get_hardware("gh200")
    assert gh.bw_h2d == pytest.approx(2.4 * gh.bw_d2h)
    with pytest.raises(ValueError, match="unknown hardware 'h300'"):
        get_hardware("h300")
    with pytest.raises(ValueError, match="bw_d2h"):
        Hardware("bad", bw_d2h=0.0, bw_h2d=1.0)


def test_hardware_from_profile():
    p = Profile((SegmentRecord(0, "s", 1.0, 2.0, True),), (), bw_d2h=7.0, bw_h2d=9.0,
                transfer_latency_s=1e-3)
    hw = Hardware.from_profile(p, get_hardware("h200"))
    assert (hw.bw_d2h, hw.bw_h2d, hw.transfer_latency_s) == (7.0, 9.0, 1e-3)
    assert hw.peak_flops == get_hardware("h200").peak_flops


def test_costmodel():
    hw = Hardware("t", bw_d2h=100.0, bw_h2d=200.0, transfer_latency_s=0.5)
    assert costmodel.d2h_seconds(100, hw) == 1.5
    assert costmodel.h2d_seconds(100, hw) == 1.0
    segs = tuple(SegmentRecord(i, f"s{i}", float(i + 1), 10.0 * (i + 1), True) for i in range(4))
    p = Profile(segs, (), bw_d2h=1.0, bw_h2d=1.0)
    assert costmodel.d2h_window_s(p, 1) == 3 + 4
    assert costmodel.h2d_window_s(p, 0, 2) == 20 + 30
    assert costmodel.h2d_window_s(p, 2, 5) == 40  # nothing past the last segment
    assert costmodel.recompute_seconds(p, 2) == 3.0
    assert costmodel.freed_per_exposed_second(100, 0.5) == 200
    assert costmodel.freed_per_exposed_second(100, 0.0) == math.inf
    assert costmodel.freed_per_exposed_second(0, 1.0) == 0


def test_gpt2_matches_korthikanti_formula():
    # Korthikanti et al. 2022: 34*s*b*h + 5*a*s^2*b bytes per layer without flash attention.
    m, s, b = get_model("gpt2-xl"), 1024, 2
    eager = sum(n for _, n in layer_records(m, s, b, flash=False))
    assert eager == 34 * s * b * m.hidden + 5 * m.heads * s * s * b
    flash = sum(n for _, n in layer_records(m, s, b, flash=True))
    assert flash == 34 * s * b * m.hidden + 4 * m.heads * s * b  # fp32 log-sum-exp


def test_llama3_8b_layer_bytes_and_flops():
    m, s = get_model("llama3-8b"), 8192
    sbh = s * m.hidden
    records = dict(layer_records(m, s, 1, flash=True))
    # 4 (norm inputs) + 6 + 4g (attention, g = 1/4) + 2 + 8 f/h (SwiGLU, f = 3.5 h) = 41
    assert sum(records.values()) == 41 * sbh + 4 * m.heads * s
    assert records["k"] == records["v"] == sbh // 2
    eager = dict(layer_records(m, s, 1, flash=False))
    assert eager["attn.probs"] == 2 * m.heads * s * s  # softmax output, saved once, bf16
    weights = 4096 * 4096 * 2.5 + 3 * 4096 * 14336
    assert layer_flops(m, s, 1, flash=True) == 2 * weights * s + 2 * s * s * 4096


def test_transformer_profile_shape_and_times():
    hw = get_hardware("h100-pcie")
    p = transformer_profile("llama3-8b", hw, seq=8192)
    assert [s.name for s in p.segments[:2]] == ["embed", "layers.0"]
    assert p.segments[-1].name == "head" and len(p.segments) == 34
    assert [s.recomputable for s in p.segments] == [False] + [True] * 32 + [False]
    layer = p.segments[1]
    assert layer.forward_s == pytest.approx(layer_flops(get_model("llama3-8b"), 8192, 1, True)
                                            / (hw.peak_flops * hw.mfu))
    assert layer.backward_s == 2 * layer.forward_s
    assert layer.input_bytes == 2 * 8192 * 4096
    assert not next(t for t in p.tensors if t.segment == 0).offloadable  # token ids: tiny
    # DESIGN.md §5: at PCIe speed, moving a layer takes 2-4x its forward
    assert 1.5 < p.saved_bytes(1) / hw.bw_d2h / layer.forward_s < 4
    with pytest.raises(ValueError, match="seq"):
        transformer_profile("llama3-8b", hw, seq=0)
    with pytest.raises(ValueError, match="unknown model"):
        transformer_profile("llama4", hw, seq=8)
