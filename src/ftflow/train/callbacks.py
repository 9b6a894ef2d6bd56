"""The trainer callbacks of every training process: the loss curve, checkpoint completion
markers, and stopping on a signal (preemption, a time limit coming).

Imported by the training processes only: it needs torch and transformers at import.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ftflow.train import curve
from ftflow.train.checkpoints import mark_complete
from ftflow.train.launcher import STOP_SIGNALS


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class LossCurve(TrainerCallback):
    """Appends what each log entry (training or validation) adds to the curve as it comes (the
    first process only); the worker writes the whole curve again at the end (curve.history_rows:
    also the steps logged before a resume, which trainer_state.json brings back)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        new = curve.rows(state.global_step, logs or {})
        if state.is_world_process_zero and new:
            curve.append(self.path, new)


class LogLastStep(TrainerCallback):
    """Logs the step training ends on (the last, or the one a stop signal ended), whatever
    train.logging_steps says: a run shorter than logging_steps still has a curve, and a curve
    ends where its weights do. (The first step: TrainingArguments.logging_first_step. Early
    stopping decides after the step's log, at its validation pass, which is logged anyway.)
    Listed after StopOnSignal, so it sees that callback's decision."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or control.should_training_stop:
            control.should_log = True


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
        self.signal = (
            self.signal or signum
        )  # the first says why (Ctrl-C sends SIGINT to all, then the stage passes it on)

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


class StepTimer(TrainerCallback):
    """The steady-state speed of a run: the seconds of its steps after the first `warmup` of this
    process (CUDA kernels are chosen and compiled, the allocator grows, torch.compile traces
    there), measured between two device synchronisations only, and the peak GPU memory. The
    summary's `speed`; benchmarks/gpu/bench.py divides tokens by it."""

    def __init__(self, warmup: int = 2):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.first = state.global_step  # a resumed run starts past 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first + self.warmup:
            self.start = (state.global_step, _synchronized_time())
        # the last step: stop the clock before the save the trainer makes after it (at the end of
        # training it always saves, whatever save_steps says: seconds of writing, not of training)
        if self.start and (state.global_step >= state.max_steps or control.should_training_stop):
            self.end = (state.global_step, _synchronized_time())

    def on_train_end(self, args, state, control, **kwargs):
        if self.start and self.end is None:  # stopped otherwise (early stopping after a validation pass)
            self.end = (state.global_step, _synchronized_time())

    def speed(self) -> dict:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        steps, seconds = (self.end[0] - self.start[0], self.end[1] - self.start[1]) if self.end else (0, 0.0)
        return {"after_step": self.start[0] if self.start else None, "steps": steps, "seconds": round(seconds, 4),
                "seconds_per_step": round(seconds / steps, 5) if steps else None,
                "peak_gpu_memory_gib": round(peak, 3) if peak is not None else None}  # fmt: skip


def _synchronized_time() -> float:
    import time

    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the queued kernels are part of the steps
    return time.perf_counter()
