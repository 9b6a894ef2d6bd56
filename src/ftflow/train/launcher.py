"""train's job side: the `accelerate launch` command line of a launcher config (conf/launcher/),
and running it with stop signals passed on to the training processes.

One config says how many processes and nodes a training run has; the Slurm profile reads the
same values for its resource request (issue: the two can never disagree). On a multi-node
Slurm job each node runs this once (one task per node) and the machine rank and the head
node's address come from Slurm's environment.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ftflow import paths
from ftflow.config.schema import Launcher, StageConfig, stage_config
from ftflow.errors import StageError

log = logging.getLogger(__name__)

# what Slurm sends before a time limit or on preemption, and Ctrl-C in a terminal (SIGINT, to the
# whole foreground process group): the workers checkpoint and stop (callbacks.StopOnSignal)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
PREEMPTED = 75  # EX_TEMPFAIL: the workers' exit status after saving on a stop signal; run again to resume
PREEMPTED_FILE = "preempted.json"  # in train's output folder: which signal, at which step


class LaunchError(StageError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_hosts(nodelist: str) -> list[str]:
    """Slurm's compressed node list (node[01-03]) expanded, as `scontrol show hostnames` does."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise LaunchError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {err}") from None
    return out.stdout.split()


def rendezvous(launcher: Launcher, env: dict[str, str]) -> tuple[int, str, int]:
    """(machine rank, head address, port) of this node."""
    if launcher.nodes == 1:
        return 0, "127.0.0.1", launcher.main_process_port or free_port()
    if "SLURM_JOB_NODELIST" not in env:
        raise LaunchError(
            f"launcher.nodes={launcher.nodes} needs Slurm: run the train rule through the Slurm profile "
            "(one task per node), which provides SLURM_JOB_NODELIST and SLURM_NODEID"
        )
    hosts = slurm_hosts(env["SLURM_JOB_NODELIST"])
    if len(hosts) != launcher.nodes:
        raise LaunchError(f"launcher.nodes={launcher.nodes} but the Slurm job has {len(hosts)} nodes: {hosts}")
    # the same port on every node, different for concurrent jobs
    port = launcher.main_process_port or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return int(env["SLURM_NODEID"]), node_address(hosts[0]), port


def node_address(node: str) -> str:
    """Where a Slurm node is reached: its NodeAddr (the node name unless slurm.conf says otherwise)."""
    out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True)
    found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return found.group(1) if found else node


def accelerate_command(launcher: Launcher, bf16: bool, module_args: list[str], env: dict[str, str],
                       adapters: bool = False) -> list[str]:  # fmt: skip
    rank, head, port = rendezvous(launcher, env)
    cmd = [
        sys.executable, "-m", "ftflow.train.launcher", "accelerate",  # accelerate_main
        "--num_processes", str(launcher.num_processes * launcher.nodes),
        "--num_machines", str(launcher.nodes),
        "--machine_rank", str(rank),
        "--main_process_ip", head,
        "--main_process_port", str(port),
        "--mixed_precision", "bf16" if bf16 else "no",
        "--dynamo_backend", "no",
        # each process gets its share of this node's cores (Slurm's cpuset when under Slurm)
        "--num_cpu_threads_per_process", str(threads_per_process(launcher)),
    ]  # fmt: skip
    cmd += distributed_flags(launcher, gather=adapters or launcher.deepspeed.gather_weights_on_save)
    return cmd + ["-m", *module_args]


def distributed_flags(launcher: Launcher, gather: bool = False) -> list[str]:
    """accelerate's flags for the launcher's kind. Multi-process on CPU goes through the same
    torchrun launcher as GPUs (--multi_gpu; `--cpu` would start a single process): the workers
    then pick gloo because the trainer is told to use the CPU."""
    if launcher.distributed == "none":
        return ["--cpu"] if launcher.cpu else []
    if launcher.distributed == "ddp":
        return ["--multi_gpu"]
    if launcher.distributed == "deepspeed":
        ds = launcher.deepspeed
        flags = ["--use_deepspeed", "--zero_stage", str(ds.zero_stage),
                 "--offload_optimizer_device", ds.offload_optimizer]  # fmt: skip
        if launcher.nodes > 1:  # torchrun on each node (started by srun), not DeepSpeed's pdsh/ssh
            flags += ["--deepspeed_multinode_launcher", "standard"]
        if ds.zero_stage == 3:
            # gathered: train/model is a loadable model; else it holds the shards for consolidate
            flags += ["--offload_param_device", ds.offload_params, "--zero3_init_flag", "false",
                      "--zero3_save_16bit_model", str(gather).lower()]  # fmt: skip
        return flags
    fs = launcher.fsdp
    return [
        "--use_fsdp", "--fsdp_version", "2",
        "--fsdp_reshard_after_forward", str(fs.sharding in ("FULL_SHARD", "HYBRID_SHARD")).lower(),
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
        "--fsdp_offload_params", str(fs.cpu_offload).lower(),
        "--fsdp_cpu_ram_efficient_loading", "false",
    ]  # fmt: skip


def node_tasks_command(launcher: Launcher, node_args: list[str], env: dict[str, str]) -> list[str]:
    """srun starting `python -m ftflow.train.launcher <node_args>` once per node of this Slurm job;
    each of those starts the node's `accelerate launch` with its own machine rank."""
    if "SLURM_JOB_ID" not in env:
        raise LaunchError(
            f"launcher.nodes={launcher.nodes} needs Slurm: run the train rule through the Slurm profile "
            "(snakemake --profile profiles/slurm), which asks for the nodes"
        )
    # --label: each log line starts with the task (= node) that wrote it
    cmd = ["srun", f"--nodes={launcher.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
    cpus = job_cpus_per_task(env["SLURM_JOB_ID"])
    if cpus:  # the step would otherwise get one CPU per task
        cmd.append(f"--cpus-per-task={cpus}")
    return cmd + [sys.executable, "-m", "ftflow.train.launcher", *node_args]


def job_cpus_per_task(job_id: str) -> int | None:
    """CPUs per task of the allocation (the train job's slurm.jobs.train.cpus), from scontrol:
    Snakemake's Slurm plugin removes the SLURM_* variables that would carry it."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    found = re.search(r"\bCPUs/Task=(\d+)", out.stdout)
    return int(found.group(1)) if found else None


def accelerate_launch(cfg: StageConfig, root: Path, env: dict) -> list[str]:
    """`accelerate launch -m ftflow.train <stage config>` for this node."""
    from ftflow.train.trainers import use_bf16

    bf16 = use_bf16(cfg.train, cfg.launcher)
    worker = ["ftflow.train", str(root / paths.TRAIN / "config.yaml"), str(root)]
    return accelerate_command(cfg.launcher, bf16, worker, env, adapters=cfg.peft.method != "none")


def block_stop_signals() -> None:
    """For the launcher processes: accelerate's and torchrun's processes then wait for the
    workers' checkpoint instead of dying first. Blocked, not ignored: the launchers may install
    their own handlers (accelerate >= 1.16 ends the workers 5 s after a SIGTERM), which do not
    run while the signal is blocked. The mask is inherited across fork and exec; each worker
    unblocks the signals once its own handler is in place (StopOnSignal), and a signal that came
    before is then delivered, not lost. (Slurm signals every process of the step.)"""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def run_forwarding_signals(cmd: list[str], env: dict, pid_dir: Path, via_srun: bool = False) -> int:
    """Run the launcher; a stop signal that reaches this process is passed to the training
    processes: on this node through the pids they write to `pid_dir` once their handler is in
    place, across nodes through srun (which signals every process of its step). A signal that
    comes before the workers are ready (Slurm's may come at any time) is passed on when they are."""
    shutil.rmtree(pid_dir, ignore_errors=True)
    pid_dir.mkdir(parents=True)
    stop: list[int] = []  # the signal, once one came
    told: set[str] = set()
    proc: subprocess.Popen | None = None

    def tell_workers():
        if via_srun:
            if proc is not None:
                proc.send_signal(signal.SIGUSR1)
            return
        for pid_file in pid_dir.glob("*.pid"):
            if pid_file.name not in told:
                told.add(pid_file.name)
                try:
                    os.kill(int(pid_file.read_text()), stop[0])  # the signal this process got
                except (ProcessLookupError, ValueError):
                    pass

    def forward(signum, frame):
        log.warning("Got %s: asking the training processes to checkpoint and stop", signal.Signals(signum).name)
        stop.append(signum)
        tell_workers()

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        with subprocess.Popen(cmd, env=env, preexec_fn=None if via_srun else block_stop_signals) as proc:
            waited = 0
            while True:
                try:
                    return proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    waited += 1
                    # workers that registered since; through srun, again every 10 s
                    if stop and (not via_srun or waited % 10 == 0):
                        tell_workers()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def accelerate_main(argv: list[str]) -> None:
    """`accelerate launch`, ending with the workers' own exit status and no traceback of it: its
    one-process launcher raises CalledProcessError for any failure, and torchrun ChildFailedError,
    so a checkpoint after Ctrl-C or a preemption signal (status PREEMPTED) would end in
    tracebacks. torchrun's summary of the failed ranks is kept, as text."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(launch_command_parser().parse_args(argv))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
    except ChildFailedError as err:
        print(err, file=sys.stderr)
        sys.exit(err.get_first_failure()[1].exitcode or 1)


def node_main(config_path: str, root: str) -> None:
    """One node's task (srun): start this node's `accelerate launch` of the training workers."""
    import yaml

    cfg = stage_config("train", yaml.safe_load(Path(config_path).read_text()))
    env = launch_env(cfg.launcher)
    cmd = accelerate_launch(cfg, Path(root), env)
    node = env.get("SLURMD_NODENAME", socket.gethostname())
    print(f"node {env.get('SLURM_NODEID')} on {node}: {' '.join(cmd)}", flush=True)
    block_stop_signals()
    os.execve(cmd[0], cmd, env)


# Thread counts of the math libraries. Snakemake sets each to the job's `threads` (1 for a rule
# that declares none), and torch takes the smallest: one thread of matrix products per process,
# whatever the cores. Each training process gets its share of the cores in all of them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def threads_per_process(launcher: Launcher) -> int:
    """This node's cores (Slurm's cpuset under Slurm) shared by its training processes."""
    return max(1, len(os.sched_getaffinity(0)) // launcher.num_processes)


def launch_env(launcher: Launcher) -> dict[str, str]:
    """Environment for the launcher and its workers."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(dict.fromkeys(THREAD_VARIABLES, str(threads_per_process(launcher))))
    # torchrun would turn SIGTERM (Slurm's preemption signal) or SIGINT (Ctrl-C) into killing the
    # workers 30 s later; the workers handle them themselves (checkpoint, then exit)
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    if launcher.distributed == "deepspeed":
        if launcher.cpu:
            env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would pick a visible GPU
        remove_stale_build_locks()
    return env


def remove_stale_build_locks(max_age_s: float = 600) -> None:
    """DeepSpeed compiles some ops on first use (on CPU: its shared-memory collective) under a
    lock file in torch's extension cache; a build killed midway leaves the lock behind and every
    later run waits on it forever. A build takes about a minute: older locks are stale."""
    import time
    from pathlib import Path

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("**/lock") if root.is_dir() else []:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink(missing_ok=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["accelerate"]:  # this node's training processes (accelerate_command)
        accelerate_main(sys.argv[2:])
    else:  # one node of a multi-node job, started by srun (node_tasks_command)
        node_main(*sys.argv[1:])
