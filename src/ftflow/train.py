"""train: TRL SFT on the packed dataset, full fine-tuning or LoRA, under `accelerate launch`.

`launch()` is what the rule (and `ftflow train`) calls: it writes the stage config and starts
`accelerate launch -m ftflow.train <config>`, which runs `main()` in every process.

Checkpoints live in results/train/checkpoints/<config fingerprint>/: a checkpoint belongs to
one config (resuming a run from another learning rate's checkpoint would be wrong), and it is
outside the rule's declared outputs so Snakemake does not delete it when a job fails; a rerun
with the same config resumes from the last one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ftflow import paths
from ftflow.config import Launcher, Model, Peft, Train, fingerprint, write_stage_config

log = logging.getLogger(__name__)

LOSS_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")


def launch(cfg: dict, root: Path = Path(".")) -> None:
    """Run the stage: write its config and start training under accelerate."""
    out_dir = root / paths.TRAIN
    write_stage_config(cfg, out_dir)
    own_files(root / paths.CHECKPOINTS / fingerprint(cfg))
    launcher = Launcher.model_validate(cfg["launcher"])
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(launcher.num_processes),
        "--num_machines", "1",
        "--mixed_precision", launcher.mixed_precision,
        "--dynamo_backend", "no",
        # every process gets its share of the cores (accelerate warns when this is left out)
        "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // launcher.num_processes)),
        *(["--cpu"] if launcher.cpu else []),
        "-m", "ftflow.train", str(out_dir / "config.yaml"), str(root),
    ]  # fmt: skip
    log.info("Launching: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


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


def attn_implementation(requested: str) -> str:
    """auto: flash-attn 2 when it is installed and a GPU is there, else PyTorch sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def init_scratch(model_cfg: Model, tok, seed: int, out: Path):
    """A randomly initialised model of model.architecture, saved as the base for evaluation."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(model_cfg.architecture)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **arch,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation(model_cfg.attn_implementation), dtype=getattr(torch, model_cfg.dtype)
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


def load_base(model_cfg: Model, tok, root: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        root / paths.base_model_dir(model_cfg.model_dump()),
        dtype=getattr(torch, model_cfg.dtype),
        attn_implementation=attn_implementation(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if len(tok) > model.get_input_embeddings().num_embeddings:
        # pack added the chat template's marker tokens to the vocabulary
        model.resize_token_embeddings(len(tok))
    return model


def lora_config(peft_cfg: Peft):
    from peft import LoraConfig

    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=peft_cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def sft_config(train_cfg: Train, launcher: Launcher, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        seed=train_cfg.seed,
        num_train_epochs=train_cfg.epochs,
        max_steps=train_cfg.max_steps,
        per_device_train_batch_size=train_cfg.per_device_batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        learning_rate=train_cfg.learning_rate,
        lr_scheduler_type=train_cfg.lr_scheduler,
        warmup_steps=train_cfg.warmup_steps,
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        bf16=train_cfg.bf16,
        gradient_checkpointing=train_cfg.gradient_checkpointing,
        logging_steps=train_cfg.logging_steps,
        save_steps=train_cfg.save_steps,
        save_total_limit=train_cfg.save_total_limit,
        use_cpu=launcher.cpu,
        report_to=[],
        # pack already tokenized, masked and packed: TRL must consume the rows as they are.
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        # the collator flattens each batch and rebuilds per-sequence position ids from
        # `seq_lengths`, so attention stays inside each packed conversation
        padding_free=True,
        remove_unused_columns=False,
    )


def loss_logger(path: Path):
    """A callback that appends every logged training step to a CSV (the loss curve)."""
    from transformers import TrainerCallback

    class LossCurve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            new = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=LOSS_FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({"step": state.global_step, **logs})

    return LossCurve()


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


def main(config_path: str, root: str = ".") -> dict:
    """Train in this process (one of the processes accelerate started)."""
    import datasets
    from transformers import AutoTokenizer, set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    root = Path(root)
    cfg = yaml.safe_load(Path(config_path).read_text())
    model_cfg, train_cfg = Model.model_validate(cfg["model"]), Train.model_validate(cfg["train"])
    peft_cfg, launcher = Peft.model_validate(cfg["peft"]), Launcher.model_validate(cfg["launcher"])
    out_dir = root / paths.TRAIN
    set_seed(train_cfg.seed)

    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    if model_cfg.source == "scratch":
        log.info("Initialising <%s> from scratch", model_cfg.name)
        model = init_scratch(model_cfg, tok, train_cfg.seed, out_dir / "init")
    else:
        log.info("Loading base model <%s>", model_cfg.name)
        model = load_base(model_cfg, tok, root)
    train_ds = datasets.load_from_disk(str(root / paths.PACK / "train"))
    eval_ds = load_packed(root / paths.PACK / "validation")

    ckpt_dir = root / paths.CHECKPOINTS / fingerprint(cfg)
    resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None
    curve = out_dir / "loss.csv"
    if resume is None and curve.exists():
        curve.unlink()  # a fresh run starts a fresh curve
    trainer = SFTTrainer(
        model=model,
        args=sft_config(train_cfg, launcher, ckpt_dir),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        peft_config=lora_config(peft_cfg) if peft_cfg.method == "lora" else None,
        callbacks=[loss_logger(curve)],
    )
    if resume:
        log.info("Resuming from %s", resume)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out_dir / "model"))  # the adapter for LoRA, full weights otherwise
    summary = {
        "train_loss": result.training_loss,
        "final_loss": _last_logged_loss(trainer.state.log_history),
        "steps": result.global_step,
        "train_runtime_s": round(time.time() - start, 1),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "resumed_from": Path(resume).name if resume else None,
        "config_fingerprint": fingerprint(cfg),
    }
    if trainer.is_world_process_zero():
        # the whole curve, also the steps logged before a resume (restored with trainer_state.json)
        write_curve(curve, trainer.state.log_history)
        tok.save_pretrained(out_dir / "model")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        prune_other_configs(ckpt_dir)
    return summary


def prune_other_configs(keep: Path) -> None:
    """Once a run has finished, drop the checkpoints of other configs: they can never be resumed
    by this config, and DVC versions the checkpoints folder as one output, so each experiment's
    version holds only its own (multi-GB) checkpoints."""
    import shutil

    for other in keep.parent.iterdir():
        if other != keep and other.is_dir():
            log.info("Removing checkpoints of another config: %s", other)
            shutil.rmtree(other)


def _last_logged_loss(history: list[dict]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(*sys.argv[1:])
