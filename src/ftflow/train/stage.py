"""The train stage's job side, once per job (several nodes: srun starts one launcher per node):
check the machine, write the stage config, start the training processes (worker.py) under
`accelerate launch`, pass stop signals on, and turn how they ended into the stage's result.

Preemption: SIGUSR1 or SIGTERM (what Slurm sends before a time limit or on preemption) makes
every process finish its step, save a checkpoint and exit with PREEMPTED; the stage then
fails with a message saying so, and the retry (Snakemake --retries, Slurm requeue) resumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ftflow import paths
from ftflow.config.params import write_stage_config
from ftflow.config.schema import Launcher, Peft, StageConfig, Train
from ftflow.errors import StageError
from ftflow.train import quantization, workers
from ftflow.train.checkpoints import (
    checkpoint_key,
    last_complete_checkpoint,
    out_of_space,
    own_files,
    remove_unusable,
    start_afresh,
)
from ftflow.train.launcher import (
    PREEMPTED,
    PREEMPTED_FILE,
    accelerate_launch,
    launch_env,
    node_tasks_command,
    run_forwarding_signals,
)

log = logging.getLogger(__name__)


class TrainError(StageError):
    pass


class Preempted(TrainError):
    exit_status = PREEMPTED  # `ftflow train` exits with it


def launch(cfg: StageConfig, root: Path = Path(".")) -> dict:
    """Run the stage: write its config, start the training processes, wait for them."""
    out_dir = root / paths.TRAIN
    write_stage_config(cfg.sections, out_dir)
    check_peft_backend(cfg.peft, cfg.launcher)
    check_accelerators(cfg.launcher)
    check_validation(cfg.train, root)
    ckpt_dir = root / paths.CHECKPOINTS / checkpoint_key(cfg.sections, root)
    if not cfg.train.resume:
        start_afresh(ckpt_dir)
    own_files(ckpt_dir)
    remove_unusable(ckpt_dir, cfg.train.checkpoint_verify)  # once per job (srun starts the nodes after this)
    (out_dir / PREEMPTED_FILE).unlink(missing_ok=True)
    env = launch_env(cfg.launcher)
    if cfg.launcher.nodes > 1:  # one `accelerate launch` per node, each started by srun
        cmd = node_tasks_command(cfg.launcher, [str(out_dir / "config.yaml"), str(root)], env)
    else:
        cmd = accelerate_launch(cfg, root, env)
    log.info("Launching: %s", " ".join(cmd))
    returncode = run_forwarding_signals(cmd, env, root / paths.WORKERS, via_srun=cfg.launcher.nodes > 1)
    preempted = out_dir / PREEMPTED_FILE
    if preempted.exists():
        info = json.loads(preempted.read_text())
        raise Preempted(
            f"training stopped on {info['signal']} at step {info['step']}; {info['checkpoint']} saved. "
            "Run the stage again to resume from it (the Slurm profile retries it)."
        )
    if returncode != 0:
        raise failure(returncode, cfg.launcher, root, ckpt_dir)
    return json.loads((out_dir / "summary.json").read_text())


def failure(returncode: int, launcher: Launcher, root: Path, ckpt_dir: Path) -> TrainError:
    """What a failed run tells the person: which rank died and what stopped the others (their
    records), whether a save ran out of space, and where the rerun resumes."""
    found = [workers.explain(root / paths.WORKERS, launcher.num_processes * launcher.nodes), out_of_space(ckpt_dir)]
    why = "; ".join(part for part in found if part)
    last = last_complete_checkpoint(ckpt_dir)
    resume = (f"The rerun resumes from {last.name}, the last complete checkpoint" if last
              else "No checkpoint is complete yet: the rerun starts over")  # fmt: skip
    detail = f": {why}" if why else ""
    return TrainError(f"training failed (exit status {returncode}){detail}. {resume} (the Slurm profile "
                      "retries the job); the log above has the details")  # fmt: skip


def check_validation(train_cfg: Train, root: Path) -> None:
    """keep=best chooses among validation passes: an empty validation split gives none."""
    if train_cfg.keep != "best":
        return
    stats = root / paths.PACK / "stats.json"
    splits = json.loads(stats.read_text())["splits"] if stats.exists() else {}
    if not splits.get("validation", {}).get("rows"):
        raise TrainError("train.keep=best keeps the checkpoint of the best validation pass, and the validation split "
                         "has no rows: give a data source `split: validation` (conf/data/demo.yaml has one)")  # fmt: skip


def check_peft_backend(peft_cfg: Peft, launcher: Launcher) -> None:
    """QLoRA quantizes the base with bitsandbytes' 4-bit kernels, which must exist for the run's
    device: CUDA on a GPU node, the CPU with a recent bitsandbytes (quantization.CPU_SINCE)."""
    if peft_cfg.method != "qlora":
        return
    import torch

    device = "cpu" if launcher.cpu or not torch.cuda.is_available() else "cuda"
    devices = quantization.kbit_devices()
    if not devices:
        raise TrainError("peft=qlora needs bitsandbytes (pip install bitsandbytes); use peft=lora on this machine")
    if device not in devices:
        raise TrainError(f"peft=qlora: the installed bitsandbytes has no 4-bit kernels for {device} (only for "
                         f"{', '.join(sorted(devices))}); use peft=lora on this machine, or bitsandbytes>="
                         f"{'.'.join(map(str, quantization.CPU_SINCE))}")  # fmt: skip


def check_accelerators(launcher: Launcher) -> None:
    """A launcher that asks for GPUs gets them or stops here (accelerate would quietly fall back
    to CPU, FSDP to DDP)."""
    if launcher.cpu:
        return
    import torch

    have = torch.cuda.device_count()
    if have < launcher.num_processes:
        raise TrainError(
            f"launcher.cpu=false with {launcher.num_processes} processes per node needs as many GPUs; "
            f"this node has {have}. On a CPU machine use launcher=local, ddp or zero3."
        )
