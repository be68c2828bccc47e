"""`python -m bench.gpucheck.worker PART --config FILE --result FILE --cap SECONDS`: run one part.

The parent (bench/gpucheck/runner.py) kills this process at the cap; a few seconds before, the
faulthandler dumps every thread's Python stack into the log, so a hang says where it hung.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
from pathlib import Path
from typing import Sequence

from .config import CheckConfig
from .parts import BY_NAME

STACK_DUMP_BEFORE_CAP_S = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the part, write its Finding as JSON to --result; exit status 0, or 1 on an exception."""
    p = argparse.ArgumentParser(prog="python -m bench.gpucheck.worker")
    p.add_argument("part", choices=sorted(BY_NAME))
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--cap", type=float, required=True, help="seconds the parent allows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    faulthandler.enable()
    faulthandler.dump_traceback_later(max(1.0, args.cap - STACK_DUMP_BEFORE_CAP_S), exit=False)
    cfg = CheckConfig.from_json(args.config.read_text())
    finding = BY_NAME[args.part].load().run(cfg, args.cap)
    faulthandler.cancel_dump_traceback_later()
    finding.write(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
