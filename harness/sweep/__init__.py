"""Sweeps of training runs: `spec` (TOML/flags -> validated runs and run ids), `manifest` (the
JSON record of a sweep, rewritten atomically), `local` (processes on this machine, GPU packing,
signals), `slurm` (sbatch jobs), `launch` (declaration -> manifest -> executor -> summary, resume)
and `cli` (the command behind launch_lr_sweep.py)."""
