"""One training process (of those `accelerate launch` started): setup, train, finish.

    python -m ftflow.train results/train/config.yaml <root>

setup() builds everything the run needs (tokenizer, models, data, the TRL trainer) into a Run;
train() runs it from the last complete checkpoint; finish() writes the model and the records,
or, after a stop signal, the preemption note the job side reads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftflow import paths
from ftflow.config.schema import Launcher, Model, Peft, StageConfig, Train, stage_config
from ftflow.train import curve, quantization, tracking, trainers, workers
from ftflow.train.callbacks import LogLastStep, LossCurve, MarkComplete, StepTimer, StopOnSignal
from ftflow.train.checkpoints import checkpoint_key, finished, last_complete_checkpoint, prune_other_configs
from ftflow.train.launcher import PREEMPTED, PREEMPTED_FILE
from ftflow.train.probe import PROBE_FILE, record_probe

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What setup built for this process."""

    cfg: StageConfig
    out_dir: Path  # results/train
    key: str  # the checkpoint key: config and data
    ckpt_dir: Path  # results/train/checkpoints/<key>
    resume: Path | None  # the last complete checkpoint
    tok: object
    trainer: object
    stop: StopOnSignal
    timer: StepTimer
    record: dict  # provenance


def main(config_path: str, root: str = ".") -> dict | None:
    """Train in this process."""
    cfg = stage_config("train", yaml.safe_load(Path(config_path).read_text()))
    with workers.recorded(Path(root) / paths.WORKERS, rank()):
        run = setup(cfg, Path(root))
        start = time.time()
        result = train(run)
        if run.stop.signal:
            stop(run)
        return finish(run, result, time.time() - start)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun for each process


# --- setup ---------------------------------------------------------------------------------------


def setup(cfg: StageConfig, root: Path) -> Run:
    from transformers import AutoTokenizer, set_seed

    from ftflow.provenance import provenance

    out_dir, key = root / paths.TRAIN, checkpoint_key(cfg.sections, root)
    ckpt_dir = root / paths.CHECKPOINTS / key
    stop = StopOnSignal()  # handlers installed before the slow part, then the pid file
    workers.announce(root / paths.WORKERS, rank())
    timer = StepTimer()
    callbacks = [LossCurve(out_dir / "loss.csv"), MarkComplete(sha256=cfg.train.checkpoint_verify == "sha256"), stop,
                 timer]  # fmt: skip
    if cfg.train.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    callbacks.append(LogLastStep())  # after every callback that may stop training

    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    base = base_weights(cfg, tok, root)
    resume = last_complete_checkpoint(ckpt_dir)
    init_process_group(cfg.launcher)
    set_seed(cfg.train.seed)
    model, ref_model = load_models(cfg, base, len(tok))
    train_ds, eval_ds = load_data(cfg.train, root)
    record = provenance(cfg.sections, root)
    report_to = start_records(cfg, key, record, root, fresh=resume is None) if rank() == 0 else []
    args = trainers.common_args(
        cfg.train, cfg.launcher, ckpt_dir, report_to, run_name=key, evaluate=eval_ds is not None
    )
    trainer = trainers.build(cfg.train, cfg.peft, args, model, ref_model, tok, train_ds, eval_ds, callbacks)
    return Run(cfg, out_dir, key, ckpt_dir, resume, tok, trainer, stop, timer, record)


def base_weights(cfg: StageConfig, tok, root: Path) -> Path:
    base = root / paths.base_model_dir(cfg.model.model_dump())
    if cfg.model.source == "scratch":
        init_scratch(cfg.model, tok, cfg.train.seed, base)
    else:
        note_pretrained(base, root)
    return base


def note_pretrained(base: Path, root: Path) -> None:
    """train's init output (declared for every model, so that dvc.yaml has one shape) holds a
    note for a pretrained model: it starts from its downloaded weights, nothing is initialised."""
    out = root / paths.TRAIN_INIT
    out.mkdir(parents=True, exist_ok=True)
    note = {"pretrained": str(base.relative_to(root)) if base.is_relative_to(root) else str(base),
            "initialised": None}  # fmt: skip
    tmp = out / f".ftflow_init.{os.getpid()}"  # every process writes the same: atomically
    tmp.write_text(json.dumps(note))
    os.replace(tmp, out / "ftflow_init.json")


def init_scratch(model_cfg: Model, tok, seed: int, out: Path) -> None:
    """Save a randomly initialised model of model.architecture as the base (for evaluation and
    merging too); every process then loads it like a downloaded base. The first process to get
    the lock writes it (the same bytes each time: seeded), the others wait for it."""
    from filelock import FileLock

    out.mkdir(parents=True, exist_ok=True)
    # what shapes the weights (the attention implementation that will run them does not)
    model = model_cfg.model_dump(exclude={"attn_implementation"})
    marker, what = out / "ftflow_init.json", {"model": model, "vocab": len(tok), "seed": seed}
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if not marker.exists() or json.loads(marker.read_text()) != what:
            _write_scratch(model_cfg, tok, seed, out)
            marker.write_text(json.dumps(what))


def _write_scratch(model_cfg: Model, tok, seed: int, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(model_cfg.architecture)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None, **arch,
    )  # fmt: skip
    torch.manual_seed(seed)
    # float32 on disk whatever the training precision: load_model casts it, as it does a
    # downloaded base, and evaluation and merging read the init at full precision
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def init_process_group(launcher: Launcher) -> None:
    """Join the other processes with launcher.collective_timeout_s as the time a collective
    waits for a lost peer. transformers passes its ddp_timeout on GPUs only (on CPU the group
    gets accelerate's 30 minutes), so on CPU the group is made here; accelerate keeps an
    existing one. DeepSpeed's is made here too, before the models are loaded (after the scratch
    init: with a process group, only rank 0's save_pretrained writes): TRL prepares DPO's
    reference model with DeepSpeed, which otherwise sees a world of one process."""
    from datetime import timedelta

    timeout = timedelta(seconds=launcher.collective_timeout_s)
    if launcher.distributed == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if launcher.cpu else "nccl", timeout=timeout)
    elif launcher.distributed == "ddp" and launcher.cpu and "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timeout)


# what auto picks on a GPU without flash-attn: the fastest implementation that keeps packed
# conversations apart in benchmarks/gpu/bench.py's attention section (README: GPU). Not measured
# on a GPU yet: sdpa, which transformers gives a block-diagonal mask from the position ids
# (checked on CPU: tests/pack/test_pack.py, and bench.py --cpu in tests/test_gpu_run.py)
GPU_WITHOUT_FLASH_ATTN = "sdpa"


def attn_implementation(requested: str) -> str:
    """auto: flash-attn 2 when it is installed and a GPU is there; on a GPU without it,
    GPU_WITHOUT_FLASH_ATTN; on CPU, PyTorch sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else GPU_WITHOUT_FLASH_ATTN


def load_dtype(model_cfg: Model, train_cfg: Train, launcher: Launcher) -> str:
    """The dtype the weights are loaded, trained and saved in. auto follows the training
    precision: bfloat16 where training runs in bf16, float32 otherwise. (bf16 weights on CPU,
    where train.bf16=auto is off, would train in pure bf16 and give a model whose float32
    copy answers differently.)"""
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    return "bfloat16" if trainers.use_bf16(train_cfg, launcher) else "float32"


def load_models(cfg: StageConfig, base: Path, vocab: int):
    """The model to train and, where the method needs one, the frozen reference: DPO/KTO
    without adapters compare against a copy of the starting model (with adapters, the same
    model with the adapters off)."""
    import torch

    log.info("process %s: %d torch threads", os.environ.get("RANK", "0"), torch.get_num_threads())
    dtype = load_dtype(cfg.model, cfg.train, cfg.launcher)
    model = load_model(cfg.model, cfg.peft, base, vocab, dtype, cfg.launcher.cpu)
    method = cfg.train.method
    needs_ref = method in ("dpo", "kto") or (method == "grpo" and cfg.train.grpo.beta > 0)
    if needs_ref and cfg.peft.method == "none":
        return model, load_model(cfg.model, cfg.peft, base, vocab, dtype, cfg.launcher.cpu)
    return model, None


def load_model(model_cfg: Model, peft_cfg: Peft, path: Path, vocab: int, dtype: str, cpu: bool):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if peft_cfg.method == "qlora":
        kwargs["quantization_config"] = quantization.quantization_config(peft_cfg)
        # each process's 4-bit copy on its own device (transformers' 4-bit loader would put every
        # process's copy on the first GPU, and accelerate then refuses to train it)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": "cpu" if cpu or not torch.cuda.is_available() else f"cuda:{local}"}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    if peft_cfg.method == "qlora":
        quantization.plain_cpu_kernels(model)
    if vocab > model.get_input_embeddings().num_embeddings:
        # pack added the chat template's marker tokens to the vocabulary
        model.resize_token_embeddings(vocab)
    return model


def load_data(train_cfg: Train, root: Path):
    """pack's train rows, and its first train.eval_rows validation rows (None without any, or
    with train.eval_steps=0; GRPO: its prompts, no validation)."""
    train_ds = load_packed(root / paths.PACK / "train")
    eval_ds = load_packed(root / paths.PACK / "validation")
    if train_cfg.method == "grpo":
        return trainers.grpo_dataset(train_ds), None
    if eval_ds is None or len(eval_ds) == 0 or train_cfg.eval_steps == 0:
        return train_ds, None
    # the same rows at every pass and on every resume: a curve, not noise
    return train_ds, eval_ds.select(range(min(len(eval_ds), train_cfg.eval_rows)))


def load_packed(path: Path):
    """A packed split, or None when no source feeds it (pack then saves it with no rows, which
    `datasets` saves but cannot load back)."""
    import datasets

    if not path.exists() or not json.loads((path / "state.json").read_text())["_data_files"]:
        return None
    return datasets.load_from_disk(str(path))


def start_records(cfg: StageConfig, key: str, record: dict, root: Path, fresh: bool) -> list[str]:
    """The first process: a fresh curve for a fresh run, the provenance beside the checkpoints,
    and the tracker's run (the trainer's `report_to`)."""
    from ftflow.provenance import git_diff, write_provenance

    out_dir, ckpt_dir = root / paths.TRAIN, root / paths.CHECKPOINTS / key
    if fresh:
        (out_dir / "loss.csv").unlink(missing_ok=True)
    write_provenance(record, git_diff(root), ckpt_dir)
    return tracking.start(cfg.tracking, run_id=key, name=f"{cfg.train.method}-{cfg.peft.method}-{key}", config=record,
                          files=[ckpt_dir / "provenance.json", ckpt_dir / "git.diff"], folder=out_dir)  # fmt: skip


# --- train -----------------------------------------------------------------------------------


def train(run: Run):
    """Train from the last complete checkpoint (or from the start)."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer, resume = run.trainer, run.resume
    if resume:
        log.info("Resuming from %s", resume)
        logging.getLogger("transformers.trainer").addFilter(TiedKeysNotMissing(trainer.model))
    if resume and finished(resume) and not trainer.is_deepspeed_enabled:
        # the last checkpoint is the end of training: load it, train nothing (resuming would
        # take one more step: the trainer checks for the end only after a step)
        log.info("%s is the end of training: loading it, nothing left to train", resume.name)
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        best = best_checkpoint(run)
        if best is not None:  # keep=best: what training would have loaded at its end
            log.info("Loading %s, the best validation pass", best.name)
        trainer._load_from_checkpoint(str(best or resume))
        return TrainOutput(trainer.state.global_step, _last_logged(trainer.state.log_history, "train_loss"), {})
    return trainer.train(resume_from_checkpoint=str(resume) if resume else None)


class TiedKeysNotMissing(logging.Filter):
    """Drops the trainer's "There were missing keys in the checkpoint model loaded: [...]" on a
    resume when every key it lists is a tied parameter (lm_head.weight of a model whose output
    layer shares the input embedding's weights): the checkpoint holds the tensor once, under the
    other name, and loading that one loads both. Any other missing key is still reported."""

    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def __init__(self, model):
        super().__init__()
        names_by_tensor: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names_by_tensor.setdefault(id(param), []).append(name)
        self.tied = {name for names in names_by_tensor.values() if len(names) > 1 for name in names}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        import ast

        return not set(ast.literal_eval(message[len(self.PREFIX) :].rstrip("."))) <= self.tied


def best_checkpoint(run: Run) -> Path | None:
    """keep=best: the checkpoint of the best validation pass so far (trainer_state.json carries
    it across restarts), in this run's checkpoint folder."""
    best = run.trainer.state.best_model_checkpoint
    if run.cfg.train.keep != "best" or not best:
        return None
    return run.ckpt_dir / Path(best).name


def kept(run: Run) -> dict:
    """Which step's weights train/model holds, and why."""
    state, train_cfg = run.trainer.state, run.cfg.train
    best = best_checkpoint(run)
    if best is None:
        why = "the last step" + (" (train.keep=last)" if train_cfg.keep == "last" else ": no validation pass yet")
        return {"checkpoint": None, "step": state.global_step, "why": why}
    order = "highest" if train_cfg.greater_is_better else "lowest"
    passes = len(curve.series(curve.history_rows(state.log_history), "validation", train_cfg.best_metric))
    return {"checkpoint": best.name, "step": int(best.name.split("-")[-1]),
            "why": f"the best validation pass: {train_cfg.best_metric} {state.best_metric:.4g}, the {order} of {passes}"}  # fmt: skip


# --- finish ----------------------------------------------------------------------------------


def stop(run: Run) -> None:
    """After a stop signal (the checkpoint is saved): say where training stopped, exit PREEMPTED."""
    if run.trainer.is_world_process_zero():
        step = run.trainer.state.global_step
        (run.out_dir / PREEMPTED_FILE).write_text(json.dumps(
            {"signal": signal.Signals(run.stop.signal).name, "step": step, "checkpoint": f"checkpoint-{step}"}))  # fmt: skip
    tracking.finish()
    end_process_group()
    sys.exit(PREEMPTED)


def finish(run: Run, result, seconds: float) -> dict:
    """The trained model (the adapter for LoRA, full weights otherwise), its probe, the curve,
    the provenance and the summary."""
    from ftflow.provenance import write_provenance

    trainer, out_dir = run.trainer, run.out_dir
    trainer.save_model(str(out_dir / "model"))
    record_probe(trainer, run.tok, out_dir / PROBE_FILE)
    summary = {
        "method": run.cfg.train.method,
        "train_loss": result.training_loss,
        "final_loss": _last_logged(trainer.state.log_history, "loss"),
        "final_validation_loss": _last_logged(trainer.state.log_history, "eval_loss"),
        "steps": result.global_step,
        "train_runtime_s": round(seconds, 1),
        "speed": run.timer.speed(),  # steady state: steps after the first two of this process
        # ZeRO-3 leaves each process a shard: ds_numel is the whole parameter's size
        "trainable_params": sum(
            getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad
        ),
        "resumed_from": run.resume.name if run.resume else None,
        "kept": kept(run),
        "config_fingerprint": run.key,
    }
    if trainer.is_world_process_zero():
        curve.write(out_dir / "loss.csv", curve.history_rows(trainer.state.log_history))
        run.tok.save_pretrained(out_dir / "model")
        write_provenance({**run.record, "kept": summary["kept"]}, "", out_dir / "model")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        prune_other_configs(run.ckpt_dir)
    tracking.finish()
    end_process_group()
    return summary


def end_process_group() -> None:
    """Leave the process group cleanly: torch can abort at interpreter exit otherwise, and the
    launcher then reports a finished run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _last_logged(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None
