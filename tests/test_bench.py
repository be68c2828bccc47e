"""The bench (`python -m bench`): smoke run, loss-curve check, max-fit search, the Llama preset."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload
from bench.contenders import SAVED_BY_SELECTIVE, Plain, TorchCheckpoint, fixed_policies
from bench.maxfit import FitConfig, largest_fitting, run_maxfit
from bench.measure import check_pass, compare_grads
from bench.presets import PRESETS
from bench.suite import runtime_settings

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FIXED = ["plain", "checkpoint", "selective", "save_on_cpu", "keep", "offload", "recompute"]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one intra-op thread, as the CLI does on a 2-core CPU: tiny models gain
    nothing from two, and with two a neighbour's load stalls every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_bench(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-progress", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quick_run_prints_table_writes_json_and_png(tmp_path):
    proc = run_bench(out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("contender"))
    assert "step ms" in header and "peak MiB" in header and "grads vs plain" in header
    for name in FIXED:
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name

    data = json.loads((tmp_path / "results.json").read_text())
    contenders, skipped = data["contenders"], {s["name"] for s in data["skipped"]}
    assert set(FIXED) <= set(contenders)
    for frac in data["meta"]["auto_budget_fractions"]:  # each auto budget either ran or says why not
        for name in (f"auto@{frac:.0%}", f"auto-block@{frac:.0%}"):  # op level and whole blocks
            assert (name in contenders) != (name in skipped), name
    for name, r in contenders.items():
        assert r["grads_match"] is True, f"{name}: gradients differ from plain by {r['grads_max_abs_diff']}"
        assert r["step_s"] > 0 and r["peak_bytes"] > 0
    assert contenders["plain"]["ratio_to_plain"] == 1.0
    assert contenders["offload"]["offloaded_bytes"] > 0
    assert contenders["recompute"]["recomputed_bytes"] > 0
    assert contenders["recompute"]["peak_bytes"] < contenders["plain"]["peak_bytes"]
    assert contenders["checkpoint"]["peak_bytes"] < contenders["plain"]["peak_bytes"]
    assert (tmp_path / "frontier.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert "USDT" not in proc.stderr and "profiler_start" not in proc.stderr, proc.stderr[:2000]


PEAKS_TWICE = r"""
import torch
from offload import PeakMemory
for _ in range(2):
    with PeakMemory("cpu") as pm:
        torch.randn(256, 256) @ torch.randn(256, 256)
    assert pm.peak_bytes > 0
print("ok")
"""


def test_peak_memory_prints_no_profiler_lines():
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", PEAKS_TWICE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert proc.stderr == ""
    proc = subprocess.run([sys.executable, "-c", PEAKS_TWICE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(env, KINETO_LOG_LEVEL="3"))
    assert "profiler_start" in proc.stderr  # a level the user set wins


@pytest.mark.parametrize("device, message", [
    ("tpu", "not a device"), ("meta", "'cpu' or 'cuda"), ("cuda:x", "not a device"),
    ("cuda:99", "CUDA"),
], ids=["tpu", "meta", "bad-index", "index-or-no-gpu"])  # none needs a GPU: ids without "cuda"
def test_bad_device_is_a_usage_error(device, message, capsys):
    from bench.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--device", device, "--skip-main"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--device {device!r}" in err or f"--device {device}" in err, err
    assert message in err, err


@pytest.mark.slow
def test_loss_curve_check_is_exactly_zero_on_cpu(tmp_path):
    proc = run_bench("--skip-main", "--steps", "3", out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max |loss - plain|" in proc.stdout
    curves = json.loads((tmp_path / "results.json").read_text())["loss_curve"]["curves"]
    assert {c["name"] for c in curves} >= {"plain", "keep", "offload", "recompute"}
    plain = curves[0]["losses"]
    assert curves[0]["name"] == "plain" and plain[0] != plain[-1]  # the optimizer really stepped
    for c in curves:
        assert c["losses"] == plain and c["max_abs_diff"] == 0.0, c


def test_budget_use_table_puts_auto_next_to_keep_and_recompute(tmp_path):
    proc = run_bench("--skip-main", "--budget-use", "0.9,0.7,0.3", out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "peak / budget" in proc.stdout and "planned / budget" in proc.stdout
    assert "USDT" not in proc.stderr, proc.stderr[:2000]
    data = json.loads((tmp_path / "results.json").read_text())["budget_use"]
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["plain", "keep", "recompute", "auto@90%", "auto@70%", "auto@30%"]
    assert rows["keep"]["saved_peak_bytes"] == data["keep_saved_peak_bytes"]
    for name in ("auto@90%", "auto@70%"):
        r = rows[name]
        assert r["device_budget"] == int(float(name[5:-1]) / 100 * data["keep_saved_peak_bytes"])
        assert r["planned_peak_bytes"] <= r["device_budget"]
        assert 0.5 * r["device_budget"] <= r["saved_peak_bytes"] <= r["device_budget"], r
    # 30% of keep's peak is below full recompute's on this 2-block model: said, not failed
    assert rows["recompute"]["saved_peak_bytes"] > rows["auto@30%"]["device_budget"]
    assert "below the least-memory plan" in proc.stdout and "auto@30%" in proc.stdout


@pytest.mark.parametrize("limit,upper,expected", [(1, 64, (1, False)), (37, 64, (37, False)),
                                                  (64, 64, (64, True)), (100, 48, (48, True)),
                                                  (0, 64, (0, False))])
def test_largest_fitting_doubles_then_bisects(limit, upper, expected):
    asked = []

    def fits(n):
        asked.append(n)
        return n <= limit

    assert largest_fitting(fits, upper) == expected
    if limit == 37:
        assert asked == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]


@pytest.mark.slow
def test_max_fit_checkpointing_fits_a_larger_batch_than_plain():
    preset = PRESETS["quick"]
    # quick model peaks (MiB): plain 2.1 / 3.8 / 7.1 at batch 1 / 2 / 4; checkpoint 4.9 at batch 4
    cfg = FitConfig(preset, CPU, cap_bytes=5 << 20, dim="batch", upper=4, warmup=0, repeats=1, budgets=(),
                    progress=False)
    results, _ = run_maxfit(cfg, [Plain(), TorchCheckpoint()])
    by = {r.name: r for r in results}
    assert (by["plain"].size, by["plain"].capped) == (2, False)
    assert (by["checkpoint"].size, by["checkpoint"].capped) == (4, True)
    for r in results:
        assert r.peak_bytes <= cfg.cap_bytes and r.tokens_per_s > 0
        assert all(p is None or p > cfg.cap_bytes for n, p in r.probes if n > r.size)


def test_selective_policy_saves_matmuls():
    assert {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm} <= SAVED_BY_SELECTIVE


def test_llama_blocks_are_found_and_every_fixed_policy_is_bitwise():
    preset = PRESETS["llama-tiny"]
    base = preset.build(CPU)
    batch = preset.batch_for(CPU)
    assert [r.name for r in offload.HybridCheckpointer(base, policy="keep").regions] == ["layers.0", "layers.1"]
    ref = check_pass(Plain().attach(copy.deepcopy(base), preset.blocks), batch, CPU)
    for c in [TorchCheckpoint()] + fixed_policies(runtime_settings(preset)):
        got = check_pass(c.attach(copy.deepcopy(base), preset.blocks), batch, CPU)
        assert compare_grads(ref.grads, got.grads) == (True, 0.0), c.name
        if c.name == "offload":
            assert got.report["offloaded_bytes"] > 0
        if c.name in ("recompute", "checkpoint"):
            assert got.peak_bytes < ref.peak_bytes


def test_oplevel_plans_one_profile_at_op_and_block_level():
    from bench.oplevel import compare, lines
    keep_peak, comparisons = compare("quick", CPU, (0.6,), None)
    (c,) = comparisons
    op, block = c.plans["op level"], c.plans["block"]
    # the op-level planner starts from the block plan: never worse on the simulator
    assert (max(0, op.predicted_peak_bytes - c.planned_bytes), op.predicted_step_s) <= \
        (max(0, block.predicted_peak_bytes - c.planned_bytes), block.predicted_step_s)
    assert not any(sp.selective for sp in block.segments)
    text = "\n".join(lines("quick", keep_peak, comparisons))
    assert "op level" in text and "budget 60% of keep" in text


def test_lag_bench_holds_the_budget_with_bitwise_gradients(capsys):
    from bench.lag import main
    assert main(["--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("bitwise equal to plain") == 3
    waits = [int(line.split()[-7]) for line in out.splitlines() if line.startswith("link at")]
    assert waits[0] == waits[1] == 0 and waits[2] > 0  # only the budgeted lagging run waits


def test_lag_bench_rejects_a_bad_share():
    from bench.lag import main
    with pytest.raises(SystemExit):
        main(["--budget", "1.5"])
