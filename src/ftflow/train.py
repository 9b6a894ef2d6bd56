"""train: a TRL trainer (train.method: sft | dpo | kto | grpo) on pack's rows, full weights or
LoRA/QLoRA, under `accelerate launch` (single process, DDP, FSDP or DeepSpeed ZeRO).

`launch()` is what the rule (and `ftflow train`) runs: it writes the stage config and starts
`accelerate launch -m ftflow.train <config>`, which runs `main()` in every process.

Checkpoints live in results/train/checkpoints/<key>/, the key a fingerprint of the stage config
and of the data: a checkpoint belongs to one config and one dataset (resuming a run from
another learning rate's or another dataset's checkpoint would be wrong), and it is
outside the rule's declared outputs so Snakemake does not delete it when a job fails; a rerun
with the same config resumes from the last complete one.

Preemption: SIGUSR1 or SIGTERM (what Slurm sends before a time limit or on preemption) makes
every process finish its step, save a checkpoint and exit with PREEMPTED; the stage then
fails with a message saying so, and the retry (Snakemake --retries, Slurm requeue) resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from ftflow import paths
from ftflow.config import write_stage_config
from ftflow.errors import StageError
from ftflow.hashing import file_sha256, fingerprint
from ftflow.launcher import STOP_SIGNALS, accelerate_launch, launch_env, node_tasks_command, run_forwarding_signals
from ftflow.schema import Launcher, Model, Peft, Tracking, Train

log = logging.getLogger(__name__)

LOSS_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")
PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving a checkpoint; run again to resume
COMPLETE = "ftflow_complete"  # marker in a checkpoint folder once every process has saved its part


class TrainError(StageError):
    pass


class Preempted(TrainError):
    exit_status = PREEMPTED  # `ftflow train` exits with it


# small files that pin down the packed data: normalize's stats (sha256 of every normalized file)
# and pack's config and stats; pack is deterministic, so these identify its output without
# hashing gigabytes of rows
DATA_RECORDS = (f"{paths.NORMALIZE}/stats.json", f"{paths.PACK}/config.yaml", f"{paths.PACK}/stats.json")


def checkpoint_key(cfg: dict, root: Path = Path(".")) -> str:
    """What a checkpoint belongs to: the config that shapes the weights (tracking does not) and
    the data it trains on. Another learning rate or another dataset never resumes it."""
    data = {name: file_sha256(root / name) for name in DATA_RECORDS if (root / name).exists()}
    return fingerprint({"config": {k: v for k, v in cfg.items() if k != "tracking"}, "data": data})


# --- the stage: once per job (several nodes: srun starts one launcher per node) -------------


def launch(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage: write its config, start the training processes, wait for them."""
    out_dir = root / paths.TRAIN
    write_stage_config(cfg, out_dir)
    launcher = Launcher.model_validate(cfg["launcher"])
    check_peft_backend(Peft.model_validate(cfg["peft"]), launcher)
    check_accelerators(launcher)
    ckpt_dir = root / paths.CHECKPOINTS / checkpoint_key(cfg, root)
    own_files(ckpt_dir)
    remove_interrupted_saves(ckpt_dir)  # once per job (srun starts the nodes after this), before anyone saves
    (out_dir / "preempted.json").unlink(missing_ok=True)
    env = launch_env(launcher)
    if launcher.nodes > 1:  # one `accelerate launch` per node, each started by srun
        cmd = node_tasks_command(launcher, [str(out_dir / "config.yaml"), str(root)], env)
    else:
        cmd = accelerate_launch(cfg, root, env)
    log.info("Launching: %s", " ".join(cmd))
    returncode = run_forwarding_signals(cmd, env, out_dir / "workers", via_srun=launcher.nodes > 1)
    preempted = out_dir / "preempted.json"
    if preempted.exists():
        info = json.loads(preempted.read_text())
        raise Preempted(
            f"training stopped on {info['signal']} at step {info['step']}; {info['checkpoint']} saved. "
            "Run the stage again to resume from it (the Slurm profile retries it)."
        )
    if returncode != 0:
        raise TrainError(f"training failed (exit status {returncode}); see the log above")
    return json.loads((out_dir / "summary.json").read_text())


def check_peft_backend(peft_cfg: Peft, launcher: Launcher) -> None:
    """QLoRA quantizes the base with bitsandbytes kernels, which need a CUDA GPU."""
    if peft_cfg.method != "qlora":
        return
    import importlib.util

    import torch

    missing = []
    if launcher.cpu or not torch.cuda.is_available():
        missing.append("a CUDA GPU (launcher.cpu=false on a GPU node)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install bitsandbytes)")
    if missing:
        raise TrainError(f"peft=qlora needs {' and '.join(missing)}; use peft=lora on this machine")


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


def own_files(ckpt_dir: Path) -> None:
    """Make the files the trainer rewrites on resume (those beside the checkpoint-<step>
    folders, such as the model card) private copies. DVC restores a persisted checkpoint
    folder as links into its cache, and writing through a link would change the cache itself;
    checkpoint-<step> folders are only ever written new, so their (large) files stay linked."""
    if not ckpt_dir.is_dir():
        return
    for path in ckpt_dir.iterdir():
        if path.is_file() and (path.is_symlink() or path.stat().st_nlink > 1):
            data = path.read_bytes()
            path.unlink()
            path.write_bytes(data)


# --- checkpoints -------------------------------------------------------------------------------


def checkpoints(ckpt_dir: Path) -> list[Path]:
    found = ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else []
    return sorted((p for p in found if p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint every process finished writing (a process killed while saving
    leaves a folder without the marker: never resumed from)."""
    complete = [p for p in checkpoints(ckpt_dir) if (p / COMPLETE).exists()]
    return complete[-1] if complete else None


def remove_interrupted_saves(ckpt_dir: Path) -> None:
    """Before the processes start: drop checkpoint folders whose save never completed."""
    for partial in (p for p in checkpoints(ckpt_dir) if not (p / COMPLETE).exists()):
        log.warning("Removing %s: its save was interrupted", partial)
        shutil.rmtree(partial, ignore_errors=True)


def run_callbacks(curve: Path):
    """Callbacks: the loss curve CSV, checkpoint completion markers, and stop-on-signal."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class LossCurve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            new = not curve.exists()
            with curve.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=LOSS_FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({"step": state.global_step, **logs})

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every process has written its shards
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / COMPLETE).write_text(json.dumps({"step": state.global_step}))

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
            if dist.is_available() and dist.is_initialized():
                device = args.device if dist.get_backend() == "nccl" else torch.device("cpu")
                flag = torch.tensor([got], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                got = int(flag.item())
            if got:
                self.signal = got
                control.should_save = True
                control.should_training_stop = True

    return [LossCurve(), MarkComplete(), StopOnSignal()]


# --- one training process ------------------------------------------------------------------------


def attn_implementation(requested: str) -> str:
    """auto: flash-attn 2 when it is installed and a GPU is there, else PyTorch sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def init_scratch(model_cfg: Model, tok, seed: int, out: Path) -> None:
    """Save a randomly initialised model of model.architecture as the base (for evaluation and
    merging too); every process then loads it like a downloaded base. The first process to get
    the lock writes it (the same bytes each time: seeded), the others wait for it."""
    from filelock import FileLock

    out.mkdir(parents=True, exist_ok=True)
    marker, what = out / "ftflow_init.json", {"model": model_cfg.model_dump(), "vocab": len(tok), "seed": seed}
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


def load_dtype(model_cfg: Model, train_cfg: Train, launcher: Launcher) -> str:
    """The dtype the weights are loaded, trained and saved in. auto follows the training
    precision: bfloat16 where training runs in bf16, float32 otherwise. (bf16 weights on CPU,
    where train.bf16=auto is off, would train in pure bf16 and give a model whose float32
    copy answers differently.)"""
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    from ftflow.trainers import use_bf16

    return "bfloat16" if use_bf16(train_cfg, launcher) else "float32"


def load_model(model_cfg: Model, peft_cfg: Peft, path: Path, vocab: int, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if peft_cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    if vocab > model.get_input_embeddings().num_embeddings:
        # pack added the chat template's marker tokens to the vocabulary
        model.resize_token_embeddings(vocab)
    return model


def load_packed(path: Path):
    """A packed split, or None when no source feeds it (pack then saves it with no rows, which
    `datasets` saves but cannot load back)."""
    import datasets

    if not path.exists() or not json.loads((path / "state.json").read_text())["_data_files"]:
        return None
    return datasets.load_from_disk(str(path))


def write_curve(path: Path, history: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(h for h in history if "loss" in h)


def main(config_path: str, root: str = ".") -> dict | None:
    """Train in this process (one of the processes accelerate started)."""
    import torch
    from transformers import AutoTokenizer, TrainerState, set_seed
    from transformers.trainer_utils import TrainOutput

    from ftflow import tracking, trainers
    from ftflow.provenance import git_diff, provenance, write_provenance

    root = Path(root)
    cfg = yaml.safe_load(Path(config_path).read_text())
    model_cfg, train_cfg = Model.model_validate(cfg["model"]), Train.model_validate(cfg["train"])
    peft_cfg, launcher = Peft.model_validate(cfg["peft"]), Launcher.model_validate(cfg["launcher"])
    out_dir, key = root / paths.TRAIN, checkpoint_key(cfg, root)
    ckpt_dir = out_dir / "checkpoints" / key
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun for each process
    callbacks = run_callbacks(out_dir / "loss.csv")  # handlers installed before the slow part
    # then the pid file: the stage signals a process once it is listed there
    pid_file = out_dir / "workers" / f"{rank}.pid"
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    pid_file.with_suffix(".tmp").rename(pid_file)

    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    base = root / paths.base_model_dir(model_cfg.model_dump())
    if model_cfg.source == "scratch":
        init_scratch(model_cfg, tok, train_cfg.seed, base)
    resume = last_complete_checkpoint(ckpt_dir)
    if launcher.distributed == "deepspeed":
        import deepspeed

        # before the models are loaded (after the scratch init: with a process group, only rank
        # 0's save_pretrained writes): TRL prepares DPO's reference model with DeepSpeed, which
        # otherwise sees a world of one process
        deepspeed.init_distributed(dist_backend="gloo" if launcher.cpu else "nccl")
    set_seed(train_cfg.seed)
    log.info("process %d: %d torch threads", rank, torch.get_num_threads())
    dtype = load_dtype(model_cfg, train_cfg, launcher)
    model = load_model(model_cfg, peft_cfg, base, len(tok), dtype)
    # DPO/KTO without adapters compare against a frozen copy of the starting model (with
    # adapters, the same model with the adapters off)
    needs_ref = train_cfg.method in ("dpo", "kto") or (train_cfg.method == "grpo" and train_cfg.grpo.beta > 0)
    ref_model = (
        load_model(model_cfg, peft_cfg, base, len(tok), dtype) if needs_ref and peft_cfg.method == "none" else None
    )
    train_ds = load_packed(root / paths.PACK / "train")
    eval_ds = load_packed(root / paths.PACK / "validation")
    if train_cfg.method == "grpo":
        train_ds, eval_ds = trainers.grpo_dataset(train_ds), None

    record = provenance(cfg, root)
    report_to: list[str] = []
    if rank == 0:
        if resume is None:
            (out_dir / "loss.csv").unlink(missing_ok=True)  # a fresh run starts a fresh curve
        write_provenance(record, git_diff(root), ckpt_dir)
        report_to = tracking.start(Tracking.model_validate(cfg["tracking"]), run_id=key,
                                   name=f"{train_cfg.method}-{peft_cfg.method}-{key}", config=record,
                                   files=[ckpt_dir / "provenance.json", ckpt_dir / "git.diff"],
                                   folder=out_dir)  # fmt: skip
    args = trainers.common_args(train_cfg, launcher, ckpt_dir, report_to, run_name=key)
    trainer = trainers.build(train_cfg, peft_cfg, args, model, ref_model, tok, train_ds, eval_ds, callbacks)
    if resume:
        log.info("Resuming from %s", resume)
    start = time.time()
    if resume and finished(resume) and not trainer.is_deepspeed_enabled:
        # the last checkpoint is the end of training: load it, train nothing (resuming would
        # take one more step: the trainer checks for the end only after a step)
        log.info("%s is the end of training: loading it, nothing left to train", resume.name)
        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        result = TrainOutput(trainer.state.global_step, _last_logged(trainer.state.log_history, "train_loss"), {})
    else:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    stop = callbacks[-1].signal
    if stop:
        if trainer.is_world_process_zero():
            step = trainer.state.global_step
            (out_dir / "preempted.json").write_text(json.dumps(
                {"signal": signal.Signals(stop).name, "step": step, "checkpoint": f"checkpoint-{step}"}))  # fmt: skip
        tracking.finish()
        end_process_group()
        sys.exit(PREEMPTED)
    trainer.save_model(str(out_dir / "model"))  # the adapter for LoRA, full weights otherwise
    record_probe(trainer, tok, out_dir / PROBE_FILE)
    summary = {
        "method": train_cfg.method,
        "train_loss": result.training_loss,
        "final_loss": _last_logged_loss(trainer.state.log_history),
        "steps": result.global_step,
        "train_runtime_s": round(time.time() - start, 1),
        # ZeRO-3 leaves each process a shard: ds_numel is the whole parameter's size
        "trainable_params": sum(
            getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad
        ),
        "resumed_from": resume.name if resume else None,
        "config_fingerprint": key,
    }
    if trainer.is_world_process_zero():
        # the whole curve, also the steps logged before a resume (restored with trainer_state.json)
        write_curve(out_dir / "loss.csv", trainer.state.log_history)
        tok.save_pretrained(out_dir / "model")
        write_provenance(record, "", out_dir / "model")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        prune_other_configs(ckpt_dir)
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


# A fixed conversation whose next-token logits the trained model records; consolidate checks
# that the model it writes gives the same (a merge, a shard conversion or a corrupted file that
# changes the weights shows up here).
PROBE = [{"role": "user", "content": "Which word comes last: red, cat, sea?"}]
PROBE_FILE = "probe.safetensors"
PROBE_POSITIONS = 8  # the last positions' logits are kept (a row of vocabulary size each)


def probe_ids(tok):
    return tok.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def record_probe(trainer, tok, path: Path) -> None:
    """The trained model's logits on the probe, from the model in memory (every process runs
    the forward: under ZeRO-3 it gathers the sharded parameters), with the precision they were
    computed in: consolidate compares like with like (16-bit logits differ from float32 ones
    by rounding alone, and that is no damage)."""
    import torch
    from safetensors.torch import save_file

    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    ids = probe_ids(tok).to(trainer.args.device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -PROBE_POSITIONS:].float().cpu()
    # the base weights' dtype (LoRA adapters may be float32 over a bf16 base; DeepSpeed casts
    # the module itself to bf16 when it trains in bf16); no autocast around this forward
    dtype = str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    if trainer.is_world_process_zero():
        meta = {"dtype": dtype, "device": ids.device.type}
        save_file({"input_ids": ids[0].cpu(), "logits": logits.contiguous()}, str(path), metadata=meta)


def prune_other_configs(keep: Path) -> None:
    """Once a run has finished, drop the checkpoints of other configs: they can never be resumed
    by this config, and DVC versions the checkpoints folder as one output, so each experiment's
    version holds only its own (multi-GB) checkpoints."""
    for other in keep.parent.iterdir():
        if other != keep and other.is_dir():
            log.info("Removing checkpoints of another config: %s", other)
            shutil.rmtree(other)


def _last_logged_loss(history: list[dict]) -> float | None:
    return _last_logged(history, "loss")


def _last_logged(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


def finished(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["max_steps"] > 0 and state["global_step"] >= state["max_steps"]


if __name__ == "__main__":
    from ftflow.progress import setup_logging

    setup_logging()
    main(*sys.argv[1:])
