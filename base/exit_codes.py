"""Exit codes, one table for the trainer, the sweep launcher and the commands."""

EXIT_OK = 0
EXIT_RUNS_FAILED = 1  # launch_lr_sweep.py: some runs did not finish
EXIT_USER_ERROR = 2  # bad input: one `error:` line on stderr
EXIT_DIVERGED = 3  # the trainer's divergence rule ended the run (status:diverged)
EXIT_PREEMPTED = 0  # a pre-empted run stopped cleanly; its log ends in status:preempted step:N
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
