"""The what-if table, the check script, and the import hygiene of the package."""
import io
import subprocess
import sys
from pathlib import Path

from scheduler import check, whatif

ROOT = Path(__file__).resolve().parents[1]


def test_whatif_prints_the_four_contenders():
    out = io.StringIO()
    assert whatif.main(["--model", "llama3-8b", "--seq", "8192", "--hardware", "h100-pcie"],
                       out=out) == 0
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("budget"))
    assert lines[start].split()[:5] == ["budget", "GiB", "contender", "step", "s"]
    rows = lines[start + 1:start + 21]
    assert len(rows) == 20 and all(rows)
    for name in ("keep-all", "full recompute", "offload-all", "plan"):
        assert sum(1 for row in rows if f" {name} " in row) == 5, name
    assert [row.split()[0] for row in rows[::4]] == ["100%", "70%", "50%", "30%", "15%"]
    assert all(" yes " in row for row in rows if " plan " in row)  # each budget is met
    assert len({len(row.split("  plan")[0]) for row in rows if " plan " in row}) == 1  # aligned


def test_check_script_runs(capsys):
    check.main(["--cases", "6", "--seed", "1"])
    text = capsys.readouterr().out
    assert "within 2% of optimum" in text and "mean planner time" in text


def test_import_scheduler_loads_neither_torch_nor_offload():
    code = ("import sys, scheduler, scheduler.check, scheduler.whatif, scheduler.synth; "
            "print(sorted(m for m in ('torch', 'numpy', 'offload') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"
