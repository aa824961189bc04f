"""A real one-node Slurm cluster for tests: a private munged, slurmctld and slurmd with their
config, state, spool, logs and sockets in one temp folder, on free non-default ports.

    from tests.slurm_cluster import slurm_cluster   # the session fixture; yields a SlurmCluster

Needs root and Debian's `slurm-wlm` and `munge` packages (`apt-get install -y slurm-wlm munge`).
Where the binaries are missing or the daemons do not come up, the fixture skips the test and
says why. Jobs see the cluster through SLURM_CONF, which the fixture sets for the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
START_TIMEOUT_S = 30.0
# a requeued job waits this long before it starts again (Slurm's default: 120 s)
CRED_EXPIRE_S = 10


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which is not on every PATH
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    partition: str
    node: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def log_tail(self, n: int = 20) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.root / name
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _slurm_conf(root: Path, node: str, cpus: int, mem_mb: int, ctld_port: int, slurmd_port: int, munge_sock: Path) -> str:
    return f"""\
ClusterName=sweeptest{ctld_port}
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
MailProg=/bin/true
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
"""


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under `root`; raise RuntimeError(reason) if they cannot run."""
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        raise RuntimeError(f"Slurm/munge binaries missing: {', '.join(missing)} (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        raise RuntimeError("a private Slurm cluster needs root (SlurmUser=root, munged --force)")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for d in ("state", "spool"):
        (root / d).mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = root / "munge.sock"
    node = "sweepnode"
    ctld_port, slurmd_port = _free_ports(2)
    cpus = os.cpu_count() or 1
    mem_mb = 1024
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, cpus, mem_mb, ctld_port, slurmd_port, sock))
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root=root, conf=conf, partition="debug", node=node, env=env)

    def spawn(argv: list[str], log: str) -> subprocess.Popen:
        out = open(root / log, "ab")
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        cluster.procs.append(p)
        return p

    try:
        spawn([_which("munged"), "-F", "--force", f"--socket={sock}", f"--key-file={key}",
               f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
               f"--seed-file={root}/munged.seed"], "munged.out")
        _wait_for(lambda: sock.exists(), "munged socket", cluster)
        spawn([_which("slurmctld"), "-D", "-i", "-f", str(conf)], "slurmctld.out")
        _wait_for(lambda: _ok(["scontrol", "ping"], env, "UP"), "slurmctld to answer scontrol ping", cluster)
        spawn([_which("slurmd"), "-D", "-N", node, "-f", str(conf)], "slurmd.out")
        _wait_for(lambda: _ok(["sinfo", "-h", "-N", "-o", "%T"], env, ("idle", "mixed", "alloc")),
                  "the node to become idle", cluster)
    except RuntimeError:
        cluster.stop()
        raise
    return cluster


def _ok(argv: list[str], env: dict[str, str], want) -> bool:
    try:
        r = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    want = (want,) if isinstance(want, str) else want
    return r.returncode == 0 and any(w in r.stdout for w in want)


def _wait_for(cond, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for p in cluster.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{Path(p.args[0]).name} exited with {p.returncode} while waiting for {what}:\n"
                                   + cluster.log_tail())
        if cond():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {START_TIMEOUT_S:.0f}s waiting for {what}:\n" + cluster.log_tail())


@pytest.fixture(scope="session")
def slurm_cluster():
    root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    try:
        cluster = start_cluster(root)
    except RuntimeError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cannot start a one-node Slurm cluster: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
