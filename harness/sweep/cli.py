"""Launch a sweep of training runs: locally (sequential, --parallel K, or packed onto GPUs) or
on Slurm; survive failed runs; resume; print a summary, best first, against the baseline.

    python launch_lr_sweep.py sweeps/spectral_lr.toml                  # the seed experiment
    python launch_lr_sweep.py --grid spectral_lr_mul=0,0.02,0.05,0.1,0.5,1 --seeds 0,1,2 \\
        --script train_gpt_muon_new.py --tag spectral_lr --baseline train_gpt.py --nproc 8
    python launch_lr_sweep.py sweeps/tiny_ord.toml --parallel 2        # CPU
    python launch_lr_sweep.py sweeps/spectral_lr.toml --slurm --partition gpu --time 02:00:00
    python launch_lr_sweep.py ... --slurm --array --array_parallel 4   # one job array, 4 tasks at a time
    python launch_lr_sweep.py ... --slurm --requeue --time 04:00:00     # pre-empted: requeue, resume
    python launch_lr_sweep.py --resume spectral_lr-20260101-120000     # rerun what did not finish
    python launch_lr_sweep.py ... --dry_run                            # print every command

Every run is validated (unknown field, bad value, batch arithmetic) before the first starts.
The manifest logs/sweeps/<sweep_id>.json records each run's command, run id, status, exit code
and final val loss. Exit status: 0 all runs finished, 1 some did not, 2 bad input, 130 stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from base import UserError
from base.cli import ArgumentParser
from harness.sweep.launch import check_data, create_sweep, dry_run_text, exit_status, plan_resume, refresh_from_logs, summary_table
from harness.sweep.local import LocalExecutor, detect_gpus
from harness.sweep.manifest import Manifest
from harness.sweep.slurm import SlurmExecutor, SlurmOptions, queued_states, require_slurm
from harness.sweep.spec import DEFAULT_MAX_RUNS, SweepSpec, apply_flags, load_sweep_file

REPO_ROOT = Path(__file__).resolve().parents[2]  # where the training scripts are


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="launch_lr_sweep.py", description=__doc__,
                       usage="%(prog)s [SWEEP_FILE] [--grid FIELD=V1,V2 ...] [--set FIELD=VALUE ...] [options]",
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("sweep_file", nargs="?", metavar="SWEEP_FILE", help="a sweep TOML file (sweeps/*.toml)")
    d = p.add_argument_group("declaring runs (on top of the file, or alone)")
    d.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a grid axis over a config field (repeat for a cartesian product); list fields: items joined by ':'")
    d.add_argument("--seeds", metavar="S1,S2", help="comma-separated seeds for every run (default 0)")
    d.add_argument("--script", help="training script of the --grid runs (default train_gpt.py)")
    d.add_argument("--tag", help="tag prefix of the --grid runs (tags are TAG_<value>)")
    d.add_argument("--baseline", action="append", default=[], metavar="SCRIPT",
                   help="add baseline runs with this script and the shared settings")
    d.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a config value shared by every run (repeatable)")
    d.add_argument("--preset", help="config preset of every run")
    d.add_argument("--nproc", type=int, metavar="N", help="processes (GPUs) per run and node")
    d.add_argument("--name", help="sweep name (the sweep id is NAME-<timestamp>)")
    d.add_argument("--max_runs", type=int, default=DEFAULT_MAX_RUNS, metavar="N",
                   help="refuse a sweep of more than N runs (default 200)")
    d.add_argument("--log_dir", default="logs", metavar="DIR", help="run logs and logs/sweeps/ manifests (default logs)")
    x = p.add_argument_group("executing")
    x.add_argument("--dry_run", action="store_true", help="print every command (or sbatch script) and exit")
    x.add_argument("--parallel", type=int, metavar="K", help="runs at once (CPU default 1; GPU default: as many as fit); on CPU each run's processes get cores/(K*nproc) threads unless OMP_NUM_THREADS is set")
    x.add_argument("--gpus", metavar="IDS", help="GPUs to pack runs onto: comma-separated ids, or 'none' (default: detected)")
    x.add_argument("--torchrun", choices=("auto", "always"), default=None,
                   help="auto: plain python for 1-process runs; always: torchrun even then")
    x.add_argument("--grace", type=float, default=None, metavar="SECONDS", help="seconds runs get to stop after Ctrl-C (default 20)")
    x.add_argument("--python", default=sys.executable, metavar="PATH", help="Python that runs the trainer (default: this one)")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true", help="one sbatch job per run (or one array: --array)")
    s.add_argument("--partition", metavar="NAME", help="Slurm partition (default: the cluster's default)")
    s.add_argument("--time", metavar="HH:MM:SS", help="job time limit (the run gets SIGTERM --signal_s before it and checkpoints)")
    s.add_argument("--nodes", type=int, metavar="N", help="nodes per run (default 1)")
    s.add_argument("--gpus_per_node", type=int, metavar="N",
                   help="GPUs to request per node (default: the run's nproc; none for a CPU preset such as tiny); 0 for CPU nodes")
    s.add_argument("--signal_s", type=int, metavar="SECONDS", help="seconds before the time limit to send SIGTERM (default 120)")
    s.add_argument("--sbatch_arg", action="append", default=[], metavar="ARG", help="an extra #SBATCH argument")
    s.add_argument("--poll", type=float, metavar="SECONDS", help="seconds between squeue polls (default 10)")
    s.add_argument("--no_wait", action="store_true", help="submit and exit; --resume ID later waits and summarizes")
    s.add_argument("--array", action="store_true", help="one sbatch job array for the runs instead of one job each")
    s.add_argument("--array_parallel", type=int, metavar="K", help="with --array: at most K tasks run at once")
    s.add_argument("--requeue", action="store_true",
                   help="a job pre-empted (SIGTERM, e.g. --signal_s before --time) requeues itself and resumes from its checkpoint")
    r = p.add_argument_group("resuming")
    r.add_argument("--resume", metavar="SWEEP_ID", help="rerun the runs of this sweep that have no finished log")
    r.add_argument("--keep_diverged", action="store_true", help="with --resume: keep diverged runs as results")
    r.add_argument("--summary", metavar="SWEEP_ID", help="print the summary of a sweep from its logs and exit")
    return p


def _slurm_options(args, saved: dict) -> SlurmOptions:
    base = SlurmOptions(**{k: v for k, v in saved.items() if k in SlurmOptions.__dataclass_fields__})
    for name, attr in (("partition", "partition"), ("time", "time"), ("nodes", "nodes"), ("gpus_per_node", "gpus_per_node"),
                       ("signal_s", "signal_s"), ("poll", "poll_s")):
        value = getattr(args, name)
        if value is not None:
            setattr(base, attr, value)
    if args.sbatch_arg:
        base.extra = list(args.sbatch_arg)
    base.array = base.array or args.array
    base.requeue = base.requeue or args.requeue
    if args.array_parallel is not None:
        if not base.array:
            raise UserError(f"--array_parallel {args.array_parallel}: only with --array (one job array for the runs)")
        if args.array_parallel < 1:
            raise UserError(f"--array_parallel {args.array_parallel}: must be >= 1")
        base.array_parallel = args.array_parallel
    base.wait = not args.no_wait  # per call: a --resume of a --no_wait sweep waits unless told otherwise
    if base.nodes < 1:
        raise UserError(f"--nodes {base.nodes}: must be >= 1")
    return base


def _gpus(args) -> list[str]:
    if args.gpus is None:
        return detect_gpus()
    if args.gpus.strip().lower() in ("none", ""):
        return []
    return [g.strip() for g in args.gpus.split(",") if g.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    log_dir = str(Path(args.log_dir).resolve())
    if args.summary:
        manifest = Manifest.load(log_dir, args.summary)
        refresh_from_logs(manifest)
        print(summary_table(manifest))
        return exit_status(manifest, True)

    executor_saved: dict = {}
    if args.resume:
        if args.sweep_file or args.grid or args.baseline:
            raise UserError("--resume SWEEP_ID takes no sweep file, --grid or --baseline (the manifest has the runs)")
        manifest = Manifest.load(log_dir, args.resume)
        executor_saved = manifest.executor
        slurm = args.slurm or executor_saved.get("kind") == "slurm"
        opts = _slurm_options(args, executor_saved.get("slurm", {})) if slurm else None
        use_torchrun = args.torchrun or executor_saved.get("torchrun", "auto")
        todo = plan_resume(manifest, python=args.python, use_torchrun=use_torchrun, keep_diverged=args.keep_diverged,
                           nodes=opts.nodes if opts else 1, slurm_active=queued_states if slurm else None)
        manifest.argv = argv
    else:
        spec = load_sweep_file(args.sweep_file) if args.sweep_file else SweepSpec()
        apply_flags(spec, sets=args.set, grids=args.grid, seeds=args.seeds, script=args.script, tag=args.tag,
                    baselines=args.baseline, preset=args.preset, nproc=args.nproc, name=args.name)
        slurm = args.slurm
        opts = _slurm_options(args, {}) if slurm else None
        use_torchrun = args.torchrun or "auto"
        manifest = create_sweep(spec, repo_root=REPO_ROOT, log_dir=log_dir, max_runs=args.max_runs, python=args.python,
                                use_torchrun=use_torchrun, nodes=opts.nodes if opts else 1, argv=argv)
        todo = list(manifest.runs)

    slurm_only = [f for f, on in (("--array", args.array), ("--array_parallel", args.array_parallel is not None),
                                  ("--requeue", args.requeue)) if on]
    if slurm_only and not slurm:
        raise UserError(f"{slurm_only[0]}: only with --slurm (Slurm job arrays and requeueing)")
    if slurm:
        executor = SlurmExecutor(manifest, REPO_ROOT, opts, python=args.python)
        manifest.executor = {"kind": "slurm", "slurm": opts.to_json(), "torchrun": use_torchrun}
    else:
        gpus = _gpus(args) if args.gpus is not None or not executor_saved.get("gpus") else list(executor_saved["gpus"])
        parallel = args.parallel if args.parallel is not None else executor_saved.get("parallel", None if gpus else 1)
        if parallel is not None and parallel < 1:
            raise UserError(f"--parallel {parallel}: must be >= 1")
        grace = args.grace if args.grace is not None else executor_saved.get("grace", 20.0)
        if not (grace >= 0 and grace < float("inf")):
            raise UserError(f"--grace {grace:g}: must be a finite number of seconds >= 0")
        executor = LocalExecutor(manifest, REPO_ROOT, parallel=parallel, gpus=gpus, grace_s=grace)
        manifest.executor = {"kind": "local", "parallel": parallel, "gpus": gpus, "grace": grace, "torchrun": use_torchrun}

    if args.dry_run:
        print(dry_run_text(manifest, executor.scripts_for if slurm else None))
        return 0
    check_data(todo, REPO_ROOT, log_dir)
    if slurm:
        require_slurm()
    else:
        executor.check(todo)
    print(f"sweep {manifest.sweep_id}: {len(todo)} run(s) to do of {len(manifest.runs)}; manifest {manifest.path}; "
          f"run outputs in {manifest.run_dir}/", flush=True)
    manifest.save()
    completed = executor.run(todo) if todo else True
    manifest.save()
    if slurm and not opts.wait:
        print(f"submitted; follow with: python monitor_runs.py --sweep {manifest.sweep_id}; "
              f"summary: python launch_lr_sweep.py --resume {manifest.sweep_id}")
        return 0
    refresh_from_logs(manifest)
    manifest.save()
    print()
    print(summary_table(manifest))
    return exit_status(manifest, completed)
