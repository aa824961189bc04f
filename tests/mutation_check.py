"""Mutation check: does the suite see the bugs its tests are named after?

Each mutation is a one-line text substitution in one file. For each, the repository (tracked
and untracked, non-ignored files, plus data/local when present) is copied to a scratch
directory, the substitution is applied there (never in the working tree), the targeted tests
run in that copy, and the mutation is reported `caught` (the tests failed) or `survived`.

    python tests/mutation_check.py                 # every mutation
    python tests/mutation_check.py resume monitor  # the ones whose name contains a word
    python tests/mutation_check.py --baseline      # first check the targeted tests pass unmutated
    python tests/mutation_check.py --list
    python tests/mutation_check.py --before 410e381  # the same, against that commit's tests/
                                                   # (the targeted files that exist there, whole)

Exit code: 0 when every mutation run was caught, 1 when one survived, 2 on a usage error
(unknown name, or a substitution that no longer matches exactly once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest node ids (relative to the repository root)
    why: str = ""
    cuda_only: bool = False  # the catching test needs CUDA (skipped here: reported, not run)
    before: tuple[str, ...] = ()  # with --before: the old tests that should have seen it (besides
    #                               those of `tests` that already existed there)


M = Mutation
T = "tests/"
WORLD = T + "test_optim_world.py"
OPTIM_REF = T + "test_optim.py::test_sharded_optimizer_matches_single_tensor_reference"
PARITY = T + "test_fork_parity_optim.py"  # skipped (so: SURVIVED) where ../shared is absent
# the old monitor tests, less the --watch ones (a pty and a live refresh: slow on a busy machine,
# and not about these numbers)
MONITOR_BEFORE = tuple(f"{T}test_monitor_runs.py::{t}" for t in (
    "test_once_json_fields_match_the_logs", "test_csv_filter_and_table", "test_fixtures_table_json",
    "test_sweep_manifest", "test_refresh_is_incremental")) + (T + "test_runlog_synthetic.py",)
MUTATIONS: list[Mutation] = [
    # --- resume -------------------------------------------------------------------------------
    M("resume/train_time_reset", "harness/trainer.py",
      "self.state = RunState(**saved)", 'self.state = RunState(**{**saved, "train_time_ms": 0.0})',
      (T + "test_resume_state.py",), "train_time_ms restarts from 0 on resume",
      before=(T + "test_checkpoint_unit.py", T + "test_checkpoint_resume.py")),
    M("resume/val_step_reset", "harness/trainer.py",
      "self.state = RunState(**saved)", 'self.state = RunState(**{**saved, "val_step": -1})',
      (T + "test_resume_state.py",), "a resumed run forgets it validated at the resume step (validates again)",
      before=(T + "test_checkpoint_unit.py", T + "test_checkpoint_resume.py")),
    # --- monitor ------------------------------------------------------------------------------
    M("monitor/best_is_last", "harness/logs/runs.py",
      "best = min(finite, key=lambda r: r.val_loss)", "best = finite[-1]",
      (T + "test_monitor_runs.py::test_best_is_the_lowest_validation_not_the_last",),
      '"best" validation is the last one', before=MONITOR_BEFORE),
    M("monitor/nan_val_not_diverged", "harness/logs/runs.py",
      "for v in (last_train, last_val)", "for v in (last_train,)",
      (T + "test_monitor_runs.py::test_best_is_the_lowest_validation_not_the_last",),
      "a log whose last validation is NaN (no status line) shows as running, not diverged",
      before=MONITOR_BEFORE),
    # --- spectral metrics ---------------------------------------------------------------------
    M("spectral/cond_cutoff_moved", "harness/spectral.py",
      "kept = torch.where(s > rtol * s1", "kept = torch.where(s > 1e3 * rtol * s1",
      (T + "test_spectral_metrics.py::test_condition_number_cutoff_is_pinned",),
      "the condition number's null-direction cutoff 1000x higher",
      before=(T + "test_spectral_metrics.py", T + "test_diagnostics_instrument.py")),
    M("spectral/rtol_min_dim", "harness/spectral.py",
      "return max(shape[-2:]) * torch.finfo(dtype).eps", "return min(shape[-2:]) * torch.finfo(dtype).eps",
      (T + "test_spectral_metrics.py::test_condition_number_cutoff_is_pinned",),
      "rank tolerance min(m, n) eps instead of numpy's max(m, n) eps",
      before=(T + "test_spectral_metrics.py", T + "test_diagnostics_instrument.py")),
    # --- triton -------------------------------------------------------------------------------
    M("triton/fp32_uses_tf32", "kernels/triton_kernels.py", 'return "ieee"', 'return "tf32"',
      (T + "test_kernels_triton.py::test_float32_input_precision_follows_torch_tf32_setting",
       T + "test_kernels_triton.py::test_cuda_float32_does_not_silently_use_tf32"),
      "float32 inputs silently rounded to TF32 (numerically: the CUDA test)", before=(T + "test_kernels_triton.py",)),
    M("triton/tf32_setting_ignored", "kernels/triton_kernels.py",
      "if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:", "if dtype == torch.float32:",
      (T + "test_kernels_triton.py::test_float32_input_precision_follows_torch_tf32_setting",),
      "float32 never uses TF32 even where torch allows it (slow path)", before=(T + "test_kernels_triton.py",)),
    # --- tautologies, now independent computations ---------------------------------------------
    M("taut/orthogonalize_cpu_bf16", "kernels/newton_schulz.py",
      'return torch.bfloat16 if device.type == "cuda" else torch.float32', "return torch.bfloat16",
      (T + "test_kernels_orthogonalize.py::test_env_override",), "the CPU default working dtype becomes bfloat16"),
    M("taut/corpus_split_by_position", "data/prepare_corpus.py",
      "key=lambda i: _val_rank(names[i])", "key=lambda i: i",
      (T + "test_data_corpus.py::test_split_takes_just_enough_documents",),
      "validation documents by position instead of by hash of the name"),
    M("taut/zero_gradient_transformed", "harness/spectral.py",
      "live = s > default_rtol(M.shape, s.dtype) * s[..., :1]", "live = s >= default_rtol(M.shape, s.dtype) * s[..., :1]",
      (T + "test_experiments_run.py::test_rank_manipulation",),
      "reshape_spectrum turns a zero gradient into a non-zero one (orthonormal/equalized)",
      before=(T + "test_spectral_metrics.py",)),
    M("taut/head_as_embedding", "harness/model.py", 'specs.append(ParamSpec(name, "lm_head"))',
      'specs.append(ParamSpec(name, "embed"))',
      (T + "test_train.py::test_config_line_has_tag_and_assignment",),
      "the head gets the token embedding's Adam group"),
    M("taut/rank_ratio_vs_raw_grad", "harness/diagnostics.py",
      'ns_in_sv = sv["mom"] if', 'ns_in_sv = sv["grad"] if',
      (T + "test_diagnostics_instrument.py::test_muon_metrics_match_an_independent_computation",),
      "rank_ratio taken against the raw gradient, not the NS input"),
    # --- world size: averaging and sharding (tests/optim_reference.py at 2 and 3 gloo ranks) ----
    M("dist/reduce_scatter_sum", "harness/dist.py",
      "work = dist.reduce_scatter_tensor(out, inp.contiguous(), op=dist.ReduceOp.AVG, async_op=True)",
      "work = dist.reduce_scatter_tensor(out, inp.contiguous(), op=dist.ReduceOp.SUM, async_op=True)",
      (WORLD,), "Muon's gradient shares summed over ranks instead of averaged",
      before=(T + "test_distributed.py", T + "test_train.py::test_two_ranks_and_accumulation")),
    M("dist/all_reduce_no_divide", "harness/dist.py",
      "return lambda: (work.wait(), t.div_(n))[1]", "return lambda: (work.wait(), t)[1]",
      (WORLD,), "Adam's gradients summed over ranks (gloo) instead of averaged",
      before=(T + "test_distributed.py", T + "test_train.py::test_two_ranks_and_accumulation")),
    M("dist/padding_takes_a_share", "harness/optim.py",
      "return range(start, min(start + self.per_rank, len(self.refs)))", "return range(start, start + self.per_rank - (start > 0))",
      (WORLD,), "a rank past the first skips the last matrix of its share (3 ranks: a real matrix never updated)"),
    # --- ORD with momentum, every variant (the single-tensor reference over 4 steps) -------------
    M("ord/split_raw_gradient", "harness/optim.py", "rho, G_par = ord_split(G, W, mode.eps)",
      "rho, G_par = ord_split(grad, W, mode.eps)", (OPTIM_REF,),
      "G_par taken from the raw gradient instead of the momentum gradient", before=(T + "test_optim.py", T + "test_ord.py")),
    M("ord/after_norm_added_before", "harness/optim.py", 'if mode is not None and mode.placement == "after_norm":',
      'if mode is not None and mode.placement == "before_norm":', (OPTIM_REF,),
      "the fork's placement (after NorMuon) never adds back; before_norm adds twice"),
    M("ord/mean_units_not_converted", "harness/optim.py",
      'add_back = s * G_par if mode.units == "fork" else s * G_par / unit_scale', "add_back = s * G_par",
      (OPTIM_REF,), "ord_units mean adds G_par in fork units"),
    M("ord/reproject_ignored", "harness/optim.py", "if mode is not None and mode.reproject:", "if False:",
      (OPTIM_REF,), "--ord_reproject does nothing"),
    # --- the fork's rules (tests/test_fork_parity_optim.py; needs ../shared/reference) -----------
    M("fork/ord_projected_always", "harness/optim.py",
      'ns_in = G - (G_par if mode.form == "projected" else s * G_par)', "ns_in = G - G_par", (PARITY,),
      "Polar(G - G_par) for every s instead of the fork's G - s G_par"),
    M("fork/muon_wd_not_lr_squared", "harness/optim.py", "W - W * mask * (cfg.muon_wd * lr) * lr_eff",
      "W - W * mask * cfg.muon_wd * lr_eff", (PARITY,), "Muon decay by wd x lr_eff (ours before) not wd x lr x lr_eff"),
    M("fork/cautious_mask_inverted", "harness/optim.py", "mask = (update * W >= 0) if cfg.cautious_wd",
      "mask = (update * W < 0) if cfg.cautious_wd", (PARITY,), "decay where update and weight disagree"),
    M("fork/mlp_proj_factor_1", "harness/config.py", "muon_lr_mul_mlp_proj: float = 2.0",
      "muon_lr_mul_mlp_proj: float = 1.0", (PARITY,), "the MLP output projection loses its 2x"),
    M("fork/normuon_beta2_09", "harness/config.py", "normuon_beta2: float = 0.95", "normuon_beta2: float = 0.9",
      (PARITY,), "NorMuon beta2 0.9 (ours before)"),
    M("fork/normuon_floor", "harness/optim.py", "step_size = second_moment.clamp_min(1e-10).rsqrt_()",
      "step_size = second_moment.clamp_min(1e-8).rsqrt_()", (PARITY,), "NorMuon's floor moved"),
    M("fork/no_add_back", "harness/optim.py",
      'add_back = s * G_par if mode.units == "fork" else s * G_par / unit_scale',
      'add_back = 0 * G_par if mode.units == "fork" else s * G_par / unit_scale', (PARITY,), "ORD adds nothing back"),
    M("fork/mean_loss_units", "harness/trainer.py", "    return batch_tokens / 4", "    return 1.0", (PARITY,),
      "G_par in mean-loss units (ours before)"),
    M("fork/adam_wd_lr_not_squared", "harness/optim.py", "update.addcmul_(p, mask, value=lr * lr * wd)",
      "update.addcmul_(p, mask, value=lr * wd)", (PARITY,), "Adam decay by lr x wd"),
    M("fork/adam_eps_inside", "harness/optim.py", "update = exp_avg.div(exp_avg_sq.sqrt().add_(eps))",
      "update = exp_avg.div(exp_avg_sq.sqrt().add_(eps * 100))", (PARITY,), "Adam's eps 100x"),
    M("fork/head_wd_mul", "harness/optim.py", '"lm_head": AdamSetting(0.5, 0.95, wd_mul=150.0)',
      '"lm_head": AdamSetting(0.5, 0.95, wd_mul=15.0)', (PARITY,), "the head's decay multiplier 150 -> 15"),
    M("fork/momentum_warmup_halved", "harness/schedule.py",
      "return lo + step / self.momentum_warmup * (hi - lo)", "return lo + step / self.momentum_warmup * (hi - lo) / 2",
      (PARITY,), "Muon momentum warms up to half the gap"),
    # --- report, Slurm, CLI messages -----------------------------------------------------------
    M("report/rank_verdict_inverted", "experiments/report.py",
      "{'yes' if moved else 'no'}", "{'yes' if not moved else 'no'}",
      (T + "test_report.py::test_summary_verdicts_follow_the_numbers",),
      "(1) answers yes when the ranks did not move", before=(T + "test_report.py::test_every_section_and_summary_row",)),
    M("report/ord_no_when_one_hurt", "experiments/report.py",
      "elif hurt and len(hurt) == len(adds):", "elif hurt:",
      (T + "test_report.py::test_summary_verdicts_follow_the_numbers",),
      'ORD "no" when any add-back hurt (not all)', before=(T + "test_report.py::test_every_section_and_summary_row",)),
    M("slurm/cd_unquoted", "harness/sweep/slurm.py",
      "f\"cd {shlex.quote(str(repo_root))}\"", "f\"cd {repo_root}\"",
      (T + "test_sweep_slurm.py::test_sbatch_script_one_cpu_node_and_multi_node_gpus",),
      "the job script's cd is not shell-quoted (breaks the first script only)"),
    M("slurm/signal_at_zero", "harness/sweep/slurm.py", "if opts.signal_s > 0:", "if opts.signal_s >= 0:",
      (T + "test_sweep_slurm.py::test_sbatch_script_one_cpu_node_and_multi_node_gpus",),
      "--signal=B:TERM@0 written when no warning was asked for"),
    M("cli/monitor_watch_no_value", "monitor_runs.py",
      'f"--watch {args.watch}: the refresh interval must be > 0 seconds"', '"the refresh interval must be > 0 seconds"',
      (T + "test_monitor_runs.py::test_bad_arguments_are_one_line_errors",),
      "the error no longer names the option and value"),
    M("cli/plot_baseline_no_allowed", "harness/plots.py",
      "no such group (groups by {group_by}: {', '.join(sorted(groups))})", "no such group",
      (T + "test_plot_loss.py::test_cli_errors",), "the error no longer lists the groups allowed"),
    M("cli/corpus_missing_no_path", "data/prepare_corpus.py",
      'f"{root}: input file or directory does not exist"', '"input file or directory does not exist"',
      (T + "test_data_corpus.py::test_errors",), "the error no longer names the missing path"),
]


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree but still tracked
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    shared = ROOT.parent / "shared"
    if shared.is_dir() and not (dst.parent / "shared").exists():  # the fork-parity tests look beside the root
        (dst.parent / "shared").symlink_to(shared)
    local = ROOT / "data" / "local"
    if local.is_dir():  # the default shards: the session fixture rebuilds them otherwise
        shutil.copytree(local, dst / "data" / "local")


def use_tests_of(root: Path, rev: str) -> None:
    """Replace tests/ in the scratch copy with the tests/ of commit `rev`."""
    shutil.rmtree(root / "tests")
    tar = subprocess.run(["git", "archive", rev, "tests"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)


def tests_before(root: Path, m: Mutation) -> tuple[str, ...]:
    """The targeted tests that exist in the (old) tests/ of the copy, plus m.before."""
    out = []
    for t in m.tests + m.before:
        path = root / t.split("::")[0]
        if not path.is_file():
            continue
        if "::" in t and f"def {t.split('::')[1].split('[')[0]}(" not in path.read_text():
            continue  # a test added since
        out.append(t)
    return tuple(dict.fromkeys(out))


def apply(root: Path, m: Mutation) -> None:
    path = root / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"error: mutation {m.name}: {m.old!r} occurs {n} times in {m.file} (needs exactly 1)")
    path.write_text(text.replace(m.old, m.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    tail = [l for l in p.stdout.splitlines() if l.strip()][-1:] or [""]
    return p.returncode, tail[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="run the mutations whose name contains one of these")
    ap.add_argument("--baseline", action="store_true", help="run each targeted test set unmutated first")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--before", metavar="REV", help="run against the tests/ of commit REV instead")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the scratch directory is removed
    chosen = [m for m in MUTATIONS if not args.names or any(n in m.name for n in args.names)]
    if not chosen:
        print(f"error: no mutation matches {args.names}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file}: {m.why}")
        return 0
    survived = 0
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        clean = Path(tmp) / "clean"
        copy_repo(clean)
        if args.before:
            use_tests_of(clean, args.before)
        targets = {m.name: tests_before(clean, m) if args.before else m.tests for m in chosen}
        if args.baseline:
            for tests in dict.fromkeys(targets[m.name] for m in chosen if not m.cuda_only and targets[m.name]):
                rc, tail = run_tests(clean, tests, args.timeout)
                print(f"baseline {'ok' if rc == 0 else 'FAILS'}: {' '.join(tests)} ({tail})", flush=True)
                if rc != 0:
                    return 1
        for m in chosen:
            if m.cuda_only:
                print(f"{m.name:40s} not run (needs CUDA): {' '.join(m.tests)}", flush=True)
                continue
            tests = targets[m.name]
            if not tests:
                print(f"{m.name:40s} no test  (none of {' '.join(m.tests)} exists there)", flush=True)
                survived += 1
                continue
            work = Path(tmp) / "m"
            shutil.copytree(clean, work, symlinks=True)
            apply(work, m)
            t0 = time.monotonic()
            rc, tail = run_tests(work, tests, args.timeout)
            shutil.rmtree(work)
            # 5: no test collected (counts as survived); -1: timed out (a hang: caught, but look)
            verdict = {0: "SURVIVED", 5: "SURVIVED", -1: "timeout"}.get(rc, "caught")
            survived += verdict == "SURVIVED"
            print(f"{m.name:40s} {verdict:8s} {time.monotonic() - t0:5.0f}s  {' '.join(tests)}  [{tail}]",
                  flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
