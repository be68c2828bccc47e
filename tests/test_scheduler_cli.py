"""The what-if table, the check script, and the import hygiene of the package."""
import io
import subprocess
import sys
from pathlib import Path

from scheduler import check, whatif

ROOT = Path(__file__).resolve().parents[1]


def whatif_rows(argv):
    out = io.StringIO()
    assert whatif.main(argv, out=out) == 0
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("budget"))
    return lines[start], [line for line in lines[start + 1:] if line.strip()
                          and not line.startswith(("plan at", "mix:"))]


def test_whatif_prints_the_four_contenders():
    header, rows = whatif_rows(["--model", "llama3-8b", "--seq", "8192",
                                "--hardware", "h100-pcie"])
    assert header.split() == ["budget", "GiB", "contender", "step", "s", "vs", "keep", "peak",
                              "GiB", "of", "budget", "host", "GiB", "fits", "plan", "ms", "mix"]
    assert len(rows) == 20
    for name in ("keep-all", "full recompute", "offload-all", "plan"):
        assert sum(1 for row in rows if f" {name} " in row) == 5, name
    assert [row.split()[0] for row in rows[::4]] == ["100%", "70%", "50%", "30%", "15%"]
    plans = [row for row in rows if " plan " in row]
    assert all(" yes " in row for row in plans)  # each budget is met
    assert all(row.split(" yes ")[1].split()[0].isdigit() for row in plans)  # plan time, ms
    assert len({len(row.split("  plan")[0]) for row in plans}) == 1  # aligned


def test_whatif_llama3_70b_hides_its_copies():
    # At 8k on PCIe Gen5 a 70B layer's copy (2.6 GB at 53 GB/s) takes about its forward
    # (50 ms): the plan fits 30% of keep-all at keep-all's step time.
    _, rows = whatif_rows(["--model", "llama3-70b", "--seq", "8192", "--hardware",
                           "h100-pcie", "--budgets", "30"])
    plan = next(row for row in rows if " plan " in row)
    assert " +0.0% " in plan and " yes " in plan


def test_check_script_runs():
    out = io.StringIO()
    assert check.main(["--cases", "6", "--seed", "1", "--set", "all"], out=out) == 0
    text = out.getvalue()
    assert "within 2%" in text and "plan ms" in text and "targets" in text
    assert {line.split()[0] for line in text.splitlines()[2:-1]} >= {"random", "huge", "all"}


def test_import_scheduler_loads_neither_torch_nor_offload():
    code = ("import sys, scheduler, scheduler.check, scheduler.whatif, scheduler.synth; "
            "print(sorted(m for m in ('torch', 'numpy', 'offload') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"


def test_whatif_reads_host_budgets_as_the_library_does_and_says_what_the_codes_mean():
    out = io.StringIO()
    assert whatif.main(["--model", "llama3-8b", "--seq", "4096", "--hardware", "h100-pcie",
                        "--budgets", "50", "--host-budget", "16GiB"], out=out) == 0
    text = out.getvalue()
    assert "host budget 16.0 GiB" in text
    assert "mix: K keep, O offload" in text and "Ri recompute with its inputs offloaded" in text
    bad = subprocess.run([sys.executable, "-m", "scheduler.whatif", "--model", "llama3-8b", "--seq", "4096",
                          "--hardware", "h100-pcie", "--host-budget", "12Gb"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "lower-case 'b' means bits" in bad.stderr
