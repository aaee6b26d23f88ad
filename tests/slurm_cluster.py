"""A one-node SLURM on this machine for the launcher's tests: munged, slurmctld and slurmd, run as root.

It needs Debian's ``slurm-wlm`` (22.05) and ``munge`` (``make system`` installs them). The configuration is made for
this node (``slurmd -C``: its CPUs, sockets and memory) in a folder of its own, on free ports, and ``SLURM_CONF``
points SLURM's commands at it: a system's /etc/slurm is left alone, and two test runs on one machine get a cluster
each. A cluster that already answers ``sinfo`` is used as it is.

    python -m tests.slurm_cluster    # start one by hand and print the SLURM_CONF to export (it keeps running)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweeper.ui import free_port

# What a single machine without cgroups or accounting runs: processes tracked by parentage, no task binding,
# cores and memory as consumable resources, root as SLURM's user. KillWait: a cancelled task's worker gets
# SIGTERM and this long to record its trial and queue its retry before SIGKILL (SLURM's default; a worker that
# is done sooner exits sooner). cred_expire: a requeued job waits
# this long before it starts again (120 s by default).
CONF = """\
ClusterName=qlora-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=30
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
START_TIMEOUT_S = 60


@dataclass
class Cluster:
    """A running cluster: ``env`` points SLURM's commands at it; ``stop`` ends what this module started."""

    env: dict[str, str]
    root: Path | None = None
    """The folder of a cluster started here (None: one that was already running)."""
    pid_files: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        if self.root is None:
            return
        env = {**os.environ, **self.env}
        queued = run(["squeue", "--noheader", "--format=%i"], env).stdout.split()
        if queued:
            run(["scancel", *queued], env)
            deadline = time.monotonic() + 60
            while run(["squeue", "--noheader"], env).stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)
        for pid_file in self.pid_files:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def answers(env: dict[str, str]) -> bool:
    """The controller answers and lists a node that takes jobs."""
    try:
        done = run(["sinfo", "--noheader", "--format=%t"], {**os.environ, **env}, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = done.stdout.split()
    return done.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states)


def start_munge() -> None:
    """SLURM authenticates through munged: start it (as the munge user, with the installed key) unless it runs."""
    if shutil.which("munge") and run(["munge", "-n"]).returncode == 0:
        return
    if shutil.which("munged") is None and not Path("/usr/sbin/munged").exists():
        raise RuntimeError("munge is not installed: `make system` installs slurm-wlm and munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        made = run(["mungekey", "--create", "--keyfile", str(key)])
        if made.returncode != 0:
            raise RuntimeError(f"cannot create {key}: {made.stderr.strip()}")
        shutil.chown(key, "munge", "munge")
    sock = Path("/run/munge")
    sock.mkdir(parents=True, exist_ok=True)
    shutil.chown(sock, "munge", "munge")
    started = run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
    if started.returncode != 0 or run(["munge", "-n"]).returncode != 0:
        raise RuntimeError(f"munged does not start: {started.stderr.strip() or started.stdout.strip()}")


def node_line() -> str:
    """This node as ``slurmd -C`` describes it: name, CPUs, boards, sockets, cores, threads, memory."""
    done = run(["slurmd", "-C"])
    line = next((x for x in done.stdout.splitlines() if x.startswith("NodeName=")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"slurmd -C cannot describe this node: {done.stderr.strip()}")
    return line.strip()


def start() -> Cluster:
    """A cluster for the tests: the one ``sinfo`` already reaches, else a new one-node cluster on this machine.

    Raises:
        RuntimeError: why SLURM cannot run here, with the daemons' last log lines.
    """
    if answers({}):
        return Cluster(env={})
    if shutil.which("slurmctld") is None and not Path("/usr/sbin/slurmctld").exists():
        raise RuntimeError("SLURM is not installed: `make system` installs slurm-wlm and munge")
    if os.geteuid() != 0:
        raise RuntimeError("a one-node SLURM is started as root (SlurmUser=root); run as root, or export "
                           "SLURM_CONF for a cluster that runs")
    start_munge()
    node = node_line()
    host = node.split()[0].removeprefix("NodeName=")
    root = Path(tempfile.mkdtemp(prefix="qlora-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(host=host, root=root, node=node, ctld_port=free_port("127.0.0.1"),
                                d_port=free_port("127.0.0.1")))
    env = {"SLURM_CONF": str(conf)}
    cluster = Cluster(env=env, root=root, pid_files=[root / "slurmd.pid", root / "slurmctld.pid"])
    try:
        for daemon in ("slurmctld", "slurmd"):
            done = run([shutil.which(daemon) or f"/usr/sbin/{daemon}", "-f", str(conf)], {**os.environ, **env})
            if done.returncode != 0:
                raise RuntimeError(f"{daemon} does not start: {done.stderr.strip()}{_logs(root)}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(env):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node is not up after {START_TIMEOUT_S} s{_logs(root)}")
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _logs(root: Path, lines: int = 8) -> str:
    out = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = root / name
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
        out.append(f"\n{name}:\n  " + "\n  ".join(tail or ["(empty)"]))
    return "".join(out)


if __name__ == "__main__":
    started = start()
    print(f"export SLURM_CONF={started.env['SLURM_CONF']}" if started.env else "SLURM already answers")
