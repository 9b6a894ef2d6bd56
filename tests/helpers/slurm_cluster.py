"""A real Slurm cluster on this host, for the Slurm tests: munge, slurmctld and two slurmd
daemons that Slurm sees as two nodes (n1, n2), each on its own port.

Debian's packages (`slurmctld slurmd slurm-client munge`; .ci/run installs them) provide the
daemons. Nothing is mocked: jobs are scheduled, started by slurmd, signalled at their time
limit and recorded by Slurm's job-completion log (jobcomp/filetxt: one line per finished job,
which the tests read as Slurm's record of what ran where).

Accounting (slurmdbd) is off, so `sacct` does not work: the Snakemake profile polls with
`squeue`, which sees finished jobs for MinJobAge seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from ftflow.train.launcher import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge"
NODES = ("n1", "n2")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
CPUS = 4  # per node; more than the host has, so that small jobs run side by side
MEM_MB = 8000  # per node
# Two "GPUs" per node backed by harmless device files: Slurm schedules a GPU job, so the test
# can read what it was given; the stage then finds no CUDA device and fails, as it should.
FAKE_GPU_DEVICES = ("/dev/null", "/dev/zero")
GPUS = len(FAKE_GPU_DEVICES)
FEATURE = "bigmem"  # a node feature, for a job constraint


def _controller_running(conf: Path) -> bool:
    return subprocess.run(["pgrep", "-f", f"slurmctld .*-f {conf}"], capture_output=True).returncode == 0


def missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` is what a client needs (SLURM_CONF)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "jobcomp.log"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "LocalSlurm":
        lacking = missing()
        if lacking:
            raise RuntimeError(
                f"the Slurm tests need the Slurm and munge daemons; missing: {', '.join(lacking)}. "
                f"Install them with `{INSTALL}` (.ci/run does)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._install_config()
        self._start_munge()
        try:
            self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
            for node in NODES:
                self._daemon(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.resolve() == self.conf.resolve():
            SYSTEM_CONF.unlink()
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    # -- the pieces ---------------------------------------------------------------------------

    def _write_config(self) -> None:
        host = socket.gethostname()
        state = self.root / "state"
        state.mkdir(exist_ok=True)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={CPUS} RealMemory={MEM_MB} Gres=gpu:{GPUS} Features={FEATURE} State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(
            f"""\
ClusterName=ftflow
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SwitchType=switch/none
StateSaveLocation={state}
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
GresTypes=gpu
MinJobAge=600
KillWait=30
MailProg=/bin/true
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=20
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={",".join(NODES)} MaxTime=INFINITE State=UP
"""
        )
        (self.root / "gres.conf").write_text(
            "AutoDetect=off\n" + "".join(f"Name=gpu File={dev}\n" for dev in FAKE_GPU_DEVICES)
        )
        for node in NODES:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)

    def _install_config(self) -> None:
        """Link the config to Slurm's default path: Snakemake's jobstep plugin drops SLURM_*
        variables (SLURM_CONF too) before its inner srun, which then reads only the default."""
        if SYSTEM_CONF.is_symlink() and _controller_running(SYSTEM_CONF.resolve()):
            raise RuntimeError(
                f"another test cluster runs with {SYSTEM_CONF.resolve()}: one cluster per host, so the "
                "Slurm tests run in one pytest process"
            )
        if SYSTEM_CONF.is_symlink() or not SYSTEM_CONF.exists():
            SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
            SYSTEM_CONF.unlink(missing_ok=True)
            SYSTEM_CONF.symlink_to(self.conf)
            return
        raise RuntimeError(f"{SYSTEM_CONF} belongs to another Slurm cluster; the test cluster needs that path")

    def _start_munge(self) -> None:
        """munged on its default socket (Slurm's auth/munge talks to it there)."""
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # already running (a previous cluster in this session, or the system's)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force"], check=True)
        self._until(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")

    def _daemon(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True
            ).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())  # a line per node and partition
            return sorted(states) == sorted(NODES) and set(states.values()) == {"idle"}

        self._until(idle, "two idle nodes")

    def _until(self, ready, what: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}); logs in {self.root}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"local Slurm: no {what} after {timeout:.0f} s; logs in {self.root}")

    # -- Slurm's records ----------------------------------------------------------------------

    def finished_jobs(self) -> list[dict[str, str]]:
        """jobcomp/filetxt's records: one {field: value} per finished job."""
        if not self.jobcomp.exists():
            return []
        records = []
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            records.append(fields)
        return records

    def show_job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True, check=True
        ).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)


if __name__ == "__main__":  # start one by hand: python tests/helpers/slurm_cluster.py /tmp/slurm (stop: kill it)
    import signal
    import sys

    cluster = LocalSlurm(Path(sys.argv[1]).resolve()).start()
    print(f"running; slurm.conf: {cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        cluster.stop()
