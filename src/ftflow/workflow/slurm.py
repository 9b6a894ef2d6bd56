"""Each stage's Slurm job, as the Snakemake resources that snakemake-executor-plugin-slurm turns
into sbatch flags (profiles/slurm). The rules call `resources(VALID, stage)`, on the validated
config tree (ftflow.config.schema's defaults filled in) that config.params.load_checked returns.

Partition, account, QoS, constraint, CPUs, memory, time and GPUs come from the `slurm` config section;
the train job's GPUs per node and node count come from `launcher`, which also tells accelerate
how many processes to start: one source, so the allocation and the launch cannot disagree.
"""

from __future__ import annotations

# config key -> the plugin's resource name
_PLACEMENT = (("partition", "slurm_partition"), ("account", "slurm_account"), ("qos", "qos"),
              ("constraint", "constraint"))  # fmt: skip


def resources(valid: dict, stage: str) -> dict:
    slurm = valid["slurm"]
    job = slurm["jobs"].get(stage) or {}  # a stage without a job of its own: every value None
    out: dict = {}
    for key, resource in _PLACEMENT:
        value = job.get(key) or slurm[key]  # the stage's own value wins
        if value is not None:
            out[resource] = value
    if job.get("cpus") is not None:
        out["cpus_per_task"] = job["cpus"]
    if job.get("mem_mb") is not None:
        out["mem_mb"] = job["mem_mb"]
    if job.get("runtime") is not None:
        out["runtime"] = runtime(job["runtime"], slurm["runtime_growth"])
    if job.get("gpus"):
        out["gres"] = f"gpu:{job['gpus']}"  # --gres counts per node
    if stage == "train":
        out.update(train_resources(valid["launcher"], slurm["stop_signal_s"]))
    return out


def runtime(minutes: int, growth: float):
    """Minutes for the job; with growth > 1 each retry (Snakemake's `attempt`) asks for more."""
    if growth == 1:
        return minutes
    return lambda wildcards, attempt: round(minutes * growth ** (attempt - 1))


def train_resources(launcher: dict, stop_signal_s: int) -> dict:
    # SIGTERM reaches every process of the job's steps (not the batch shell): Snakemake waits for
    # its job on SIGTERM, and the training processes checkpoint and exit 75 (see ftflow/train/)
    out = {"nodes": launcher["nodes"], "slurm_extra": f"--signal=TERM@{stop_signal_s}"}
    if not launcher["cpu"]:
        out["gres"] = f"gpu:{launcher['num_processes']}"  # --gres counts per node (--gpus would be per job)
    if launcher["nodes"] > 1:
        # one task per node, started by the stage itself with srun (launcher.node_tasks_command); the
        # `mpi` resource makes the plugin run the stage in the batch step rather than inside a
        # one-task step that would hold the first node's resources
        out.update(mpi="srun", tasks=launcher["nodes"])
        if not launcher["cpu"]:
            out["tasks_per_gpu"] = 0  # else the plugin turns `tasks` into --ntasks-per-gpu
    return out
