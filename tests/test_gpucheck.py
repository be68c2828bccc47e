"""The GPU check (`python -m bench.gpucheck`): its dry run, its pieces that need no device, and
the marker that makes `pytest -m cuda` select every CUDA case."""
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.gpucheck import cudatests, link, pcie, race
from bench.gpucheck.cli import build_parser
from bench.gpucheck.config import DEFAULT_BUDGET_S, CheckConfig
from bench.gpucheck.noise import ABOVE, BITWISE, WITHIN, NoiseFloor, verdict
from bench.gpucheck.outcome import DRY_RUN, Finding
from bench.gpucheck.parts import PARTS
from bench.gpucheck.runner import repo_env, run_process, worker_command

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=repo_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_walks_every_part_and_exits_zero(tmp_path):
    proc = _run("-m", "bench.gpucheck", "--out", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "gpucheck.json").read_text())
    assert data["passed"] is True and data["meta"]["dry_run"] is True
    parts = {p["name"]: p for p in data["parts"]}
    assert list(parts) == [p.name for p in PARTS]
    for p in PARTS:
        got = parts[p.name]
        assert (got["status"], got["summary"]) == ("skipped", DRY_RUN)
        assert got["figures"]["plan"], p.name
        assert ("command" in got["figures"]) == p.isolated
        assert f"{p.name}: skipped" in proc.stdout
    cmd = parts["cuda-tests"]["figures"]["plan"]["command"]
    assert cmd[cmd.index("-m", 2) + 1] == "cuda" and any(a.startswith("--junitxml=") for a in cmd)
    assert parts["suite"]["figures"]["plan"]["contenders"][:2] == ["plain", "checkpoint"]
    assert "auto@30%" in parts["suite"]["figures"]["plan"]["contenders"]
    md = (tmp_path / "gpucheck.md").read_text()
    assert all(f"## {p.name}: " in md for p in PARTS)
    config = CheckConfig.from_json((tmp_path / "logs" / "config.json").read_text())
    assert config.dry_run and config.out == tmp_path.resolve() and config.budgets == (0.7, 0.5, 0.3)


def test_caps_sum_under_the_default_budget_and_smoke_is_short():
    assert sum(p.cap_s for p in PARTS) < DEFAULT_BUDGET_S
    assert PARTS[0].name == "smoke" and PARTS[0].cap_s <= 30


def test_parts_argument_keeps_run_order_and_rejects_unknown_names(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(["--out", str(tmp_path), "--parts", "suite,smoke"])
    assert [p.name for p in args.parts] == ["smoke", "suite"]
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--out", str(tmp_path), "--parts", "smoke,nonsense"])
    assert e.value.code == 2 and "--parts" in capsys.readouterr().err


def test_worker_runs_a_part_and_writes_its_finding(tmp_path):
    cfg = CheckConfig(out=tmp_path, device="cpu")
    cfg.logs.mkdir()
    (cfg.logs / "config.json").write_text(cfg.to_json())
    part = next(p for p in PARTS if p.name == "link")
    proc = subprocess.run(worker_command(part, cfg, 60), cwd=ROOT, env=repo_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    finding = Finding.read(cfg.logs / "link.json")
    assert finding.skipped and "CUDA" in finding.skipped


def test_a_process_past_its_cap_is_killed(tmp_path):
    t0 = time.monotonic()
    out = run_process([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                      tmp_path / "hang.log", timeout_s=2)
    assert out.timed_out and time.monotonic() - t0 < 20
    assert (tmp_path / "hang.log").read_text().strip() == "started"
    assert run_process([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "x.log", 30).returncode == 3


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="5">
<testcase classname="tests.test_cuda" name="test_a" time="1.0"/>
<testcase classname="tests.test_cuda" name="test_b" time="1.0"><failure message="AssertionError: step 0: loss differs&#10;more">tb</failure></testcase>
<testcase classname="tests.test_handles" name="test_c[cuda]" time="0.1"><error message="fixture failed">tb</error></testcase>
<testcase classname="tests.test_monitor" name="test_d" time="0.0"><skipped type="pytest.skip" message="needs CUDA">s</skipped></testcase>
<testcase classname="tests.test_report" name="test_e" time="0.0"><skipped type="pytest.skip" message="needs CUDA">s</skipped></testcase>
</testsuite></testsuites>"""


def test_junit_counts_and_failing_names(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    c = cudatests.parse_junit(path)
    assert (c.passed, c.failed, c.skipped) == (1, 2, 2)
    assert c.failing == ["tests.test_cuda::test_b: AssertionError: step 0: loss differs",
                         "tests.test_handles::test_c[cuda]: fixture failed"]
    assert c.skip_reasons == {"needs CUDA": 2}


def test_verbose_lines_count_what_ran_before_a_kill():
    text = textwrap.dedent("""\
        tests/test_cuda.py::test_a PASSED                                   [  5%]
        tests/test_cuda.py::test_b FAILED                                   [ 10%]
        tests/test_monitor.py::test_d SKIPPED (needs CUDA)                  [ 15%]
        tests/test_runtime.py::test_e[cuda-keep] PASSED                     [ 20%]
        some other line
        """)
    c = cudatests.parse_verbose(text)
    assert (c.passed, c.failed, c.skipped) == (2, 1, 1)
    assert c.failing == ["tests/test_cuda.py::test_b"] and c.skip_reasons == {"needs CUDA": 1}


def test_pytest_command_selects_cuda_tests_with_junit(tmp_path):
    cmd = cudatests.pytest_command(CheckConfig(out=tmp_path, test_timeout_s=45))
    assert cmd[1:5] == ["-m", "pytest", "-m", "cuda"] and cmd[-1].endswith("tests")
    assert f"--junitxml={tmp_path / 'logs' / 'cuda-tests.xml'}" in cmd
    assert ("--timeout=45" in cmd) == cudatests.timeout_plugin()


def test_every_cuda_case_carries_the_cuda_marker():
    """`pytest -m cuda` must select every CUDA case of the `device` fixture: none may be left
    under `-m 'not cuda'` (only the files whose tests take `device` are collected: it is quick)."""
    uses_device = re.compile(r"^def test_\w+\([^)]*\bdevice\b", re.M)
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if uses_device.search(f.read_text()))
    assert "tests/test_runtime.py" in files
    proc = _run("-m", "pytest", "--collect-only", "-q", "-m", "not cuda", "-p", "no:cacheprovider", *files)
    assert proc.returncode == 0, proc.stdout[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("[emulated" in i for i in ids)
    assert not [i for i in ids if "[cuda" in i or "-cuda]" in i or "-cuda-" in i]


def test_noise_verdicts():
    floor = NoiseFloor(runs=3, max_abs_diff=6.1e-05, bitwise=False)
    assert verdict(True, 0.0, floor) == BITWISE
    assert verdict(False, 6.1e-05, floor) == WITHIN
    assert verdict(False, 2.4e-04, floor) == WITHIN
    assert verdict(False, 1e-2, floor) == ABOVE
    assert verdict(False, 1e-9, NoiseFloor(3, 0.0, True)) == ABOVE  # plain repeatable: any diff is real
    assert verdict(False, float("inf"), floor) == ABOVE


def test_device_part_sections_render_their_figures():
    """The CUDA-only parts never run here; their Markdown renderers still see realistic figures."""
    link_md = link.markdown(dict(rows=[dict(bytes=256 << 20, direction="d2h", ours_gbps=51.2, torch_gbps=53.0,
                                            ratio=0.966, latency_us=9.5, min_offload_bytes=1 << 20)]))
    assert "256 MiB" in link_md and "51.20" in link_md and "0.97" in link_md
    race_md = race.markdown(dict(rows=[dict(window="compute delayed", policy="offload", bitwise=False,
                                            max_abs_diff=0.5, moved=True, offloaded_bytes=64 << 20,
                                            recomputed_bytes=0, stall_s=0.0)],
                                 plain_repeatable=True, control_caught=True))
    assert "diff 5.00e-01" in race_md and "64.0" in race_md and "control caught: True" in race_md
    pcie_md = pcie.markdown(dict(rows=[dict(direction="h2d", ours_bytes=4 << 30, nvml_bytes=int(4.2 * 2**30),
                                            ratio=1.05, source="counters", nvml_peak_gbps=50.0)],
                                 window_s=1.2, samples=120, idle_bytes_per_s=2e6, link_gen=5, link_width=16))
    assert "1.050" in pcie_md and "Gen5 x16" in pcie_md and "2.0 MB/s" in pcie_md


@pytest.mark.parametrize("name", ["link", "race", "pcie"])
def test_device_parts_skip_without_cuda(tmp_path, name):
    module = {"link": link, "race": race, "pcie": pcie}[name]
    finding = module.run(CheckConfig(out=tmp_path, device="cpu"), 10)
    assert finding.skipped and not finding.problems
