"""`python -m bench.gpucheck`: see bench/gpucheck/cli.py and `python -m bench.gpucheck --help`."""
import sys

from bench.gpucheck.cli import main

if __name__ == "__main__":
    sys.exit(main())
