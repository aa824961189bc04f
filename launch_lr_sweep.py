"""Launch a sweep of training runs: locally (sequential, --parallel K, or packed onto GPUs) or
on Slurm; survive failed runs; resume; print a summary, best first, against the baseline.

    python launch_lr_sweep.py sweeps/spectral_lr.toml                  # the seed experiment
    python launch_lr_sweep.py --resume spectral_lr-20260101-120000     # rerun what did not finish
    python launch_lr_sweep.py --help                                   # every flag, more examples

The command line is harness/sweep/cli.py (a library, so that experiments.report runs sweeps
through it too). Exit status: 0 all runs finished, 1 some did not, 2 bad input, 130 stopped.
"""

from base import run_cli
from harness.sweep.cli import main

if __name__ == "__main__":
    run_cli(main, interrupted_note="interrupted")  # Ctrl-C before any run started (validating, submitting)
