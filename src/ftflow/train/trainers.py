"""The TRL trainer of each train.method, fed pack's rows exactly as pack wrote them.

pack has already rendered, tokenized, masked (and for SFT packed) every record, so each
trainer here is told to skip its own dataset preparation:
  sft   input_ids, labels, seq_lengths -> SFTTrainer, padding-free (one flat row per batch,
        position ids restart at each packed conversation)
  dpo   prompt_ids, chosen_ids, rejected_ids -> DPOTrainer (its collator pads: TRL 1.x has
        no padding-free DPO)
  kto   prompt_ids, completion_ids, label -> KTOTrainer (+ the mismatched KL pairs it builds)
  grpo  prompt_ids, answer -> GRPOTrainer generates from the prompt ids; rewards see `answer`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftflow.config.schema import Launcher, Peft, Train


def use_bf16(train_cfg: Train, launcher: Launcher) -> bool:
    """bf16 where the hardware has it: auto means a CUDA GPU that supports bf16, never CPU."""
    if train_cfg.bf16 != "auto":
        return train_cfg.bf16
    import torch

    return not launcher.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def common_args(train_cfg: Train, launcher: Launcher, output_dir: Path, report_to: list[str], run_name: str | None,
                evaluate: bool = False) -> dict:  # fmt: skip
    """TrainingArguments shared by every trainer; `evaluate`: a validation pass every
    train.eval_steps (by default at each save)."""
    return dict(
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train_cfg.eval_steps or train_cfg.save_steps,
        per_device_eval_batch_size=train_cfg.per_device_batch_size,
        # keep=best: the trainer keeps the best checkpoint from rotation and loads it at the end
        load_best_model_at_end=train_cfg.keep == "best",
        metric_for_best_model=train_cfg.best_metric,
        greater_is_better=train_cfg.greater_is_better,
        output_dir=str(output_dir),
        seed=train_cfg.seed,
        data_seed=train_cfg.seed,
        num_train_epochs=train_cfg.epochs,
        max_steps=train_cfg.max_steps,
        per_device_train_batch_size=train_cfg.per_device_batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        learning_rate=train_cfg.learning_rate,
        lr_scheduler_type=train_cfg.lr_scheduler,
        warmup_steps=train_cfg.warmup_steps,
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        bf16=use_bf16(train_cfg, launcher),
        gradient_checkpointing=train_cfg.gradient_checkpointing,
        use_liger_kernel=train_cfg.liger_kernel,
        torch_compile=train_cfg.torch_compile,
        logging_steps=train_cfg.logging_steps,
        logging_first_step=True,  # with callbacks.LogLastStep: a short run's curve has both ends
        save_steps=train_cfg.save_steps,
        save_total_limit=train_cfg.save_total_limit,
        use_cpu=launcher.cpu,
        ddp_timeout=launcher.collective_timeout_s,  # the process group's timeout (DDP, FSDP)
        report_to=report_to,
        run_name=run_name,
        remove_unused_columns=False,  # pack's columns are the model inputs' sources
        dataloader_num_workers=0,  # rows are in memory-mapped Arrow: nothing to overlap
    )


def peft_config(peft_cfg: Peft):
    if peft_cfg.method == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=peft_cfg.target_modules,
        modules_to_save=peft_cfg.modules_to_save,
        task_type="CAUSAL_LM",
    )


def build(train_cfg: Train, peft_cfg: Peft, args: dict, model, ref_model, tok, train_ds, eval_ds, callbacks):
    """The trainer of train.method, ready to `.train()`."""
    common = dict(model=model, train_dataset=train_ds, processing_class=tok, callbacks=callbacks,
                  peft_config=peft_config(peft_cfg))  # fmt: skip
    method = train_cfg.method
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**args, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, padding_free=True)
        return SFTTrainer(args=config, eval_dataset=eval_ds, **common)
    if method == "dpo":
        from trl import DPOConfig

        config = DPOConfig(**args, beta=train_cfg.dpo.beta, loss_type=[train_cfg.dpo.loss_type], max_length=None)
        return _packed_dpo()(args=config, ref_model=ref_model, eval_dataset=eval_ds, **common)
    if method == "kto":
        from trl import KTOConfig

        k = train_cfg.kto
        config = KTOConfig(**args, beta=k.beta, desirable_weight=k.desirable_weight,
                           undesirable_weight=k.undesirable_weight, max_length=None)  # fmt: skip
        return _packed_kto()(args=config, ref_model=ref_model, eval_dataset=eval_ds, **common)
    if method == "grpo":
        from trl import GRPOConfig

        from ftflow.train.rewards import reward_functions

        g = train_cfg.grpo
        config = GRPOConfig(**args, num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                            temperature=g.temperature, beta=g.beta, reward_weights=[r.weight for r in g.rewards],
                            log_completions=False)  # fmt: skip
        return _packed_grpo()(args=config, reward_funcs=reward_functions(g.rewards), **common)
    raise ValueError(f"unknown train.method {method!r}")


# --- trainers that take pack's token ids as they are ------------------------------------------


def _packed_dpo():
    from trl import DPOTrainer

    class PackedDPO(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # prompt_ids / chosen_ids / rejected_ids are the columns DPO's collator reads
            return dataset

    return PackedDPO


def _packed_kto():
    from trl import KTOTrainer

    class PackedKTO(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset

            # KTO estimates its KL term from mismatched pairs: each batch's completions rotated
            # by one against its prompts (what TRL does after its own tokenization)
            def rotate(batch: dict[str, list]) -> dict[str, list]:
                ids = batch["completion_ids"]
                return {"KL_completion_ids": ids[-1:] + ids[:-1]}

            return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size,
                               desc=f"KL pairs of the {dataset_name} split")  # fmt: skip

    return PackedKTO


def _packed_grpo():
    from trl import GRPOTrainer

    class PackedGRPO(GRPOTrainer):
        def _tokenize_prompts(self, prompts: list[Any]):
            # the dataset's `prompt` column holds pack's prompt ids (rendered with the
            # generation prompt): generation starts from exactly those tokens
            return [list(p) for p in prompts], None, {}

    return PackedGRPO


def grpo_dataset(dataset):
    """GRPO reads prompts from a `prompt` column; pack names its ids `prompt_ids`."""
    return dataset.rename_column("prompt_ids", "prompt")
