"""The trainer callbacks of every training process: the loss curve, checkpoint completion
markers, and stopping on a signal (preemption, a time limit coming).

Imported by the training processes only: it needs torch and transformers at import.
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ftflow.train.checkpoints import mark_complete
from ftflow.train.launcher import STOP_SIGNALS

LOSS_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class LossCurve(TrainerCallback):
    """Appends each logged training loss to the curve CSV as it comes (the first process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOSS_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({"step": state.global_step, **logs})


def write_curve(path: Path, history: list[dict]) -> None:
    """The whole curve at the end, also the steps logged before a resume (trainer_state.json
    brings them back)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(h for h in history if "loss" in h)


class MarkComplete(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part: only a complete
    one is ever resumed from. The marker records its files' sizes (and sha256s)."""

    def __init__(self, sha256: bool = False):
        self.sha256 = sha256

    def on_save(self, args, state, control, **kwargs):
        if _distributed():
            dist.barrier()  # every process has written its shards
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step, self.sha256)


class StopOnSignal(TrainerCallback):
    """Save and stop at the end of the step in which any process got a stop signal; all
    processes agree (an all-reduce per step) so that they save the same step."""

    def __init__(self):
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        # the launcher blocked them (block_stop_signals); one that came since is delivered now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _handle(self, signum, frame):
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs):
        got = self.signal or 0
        if _distributed():
            device = args.device if dist.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([got], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            got = int(flag.item())
        if got:
            self.signal = got
            control.should_save = True
            control.should_training_stop = True
