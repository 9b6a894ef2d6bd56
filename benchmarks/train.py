"""ftflow's train stage vs plain TRL SFTTrainer, on the same packed data and model (CPU).

    python benchmarks/train.py [--steps 60] [--max-length 512]           # the demo's tiny model
    python benchmarks/train.py --model smollm2 [--steps 8]               # a real model, LoRA

tiny: packs the demo data (examples/demo, ChatML, a trained tokenizer) once, then trains the
demo's tiny Llama from scratch for the same number of steps. smollm2: experiment=sms_spam
(SmolLM2-135M-Instruct, its own chat template, LoRA r=16 on every linear layer, the SMS spam
data), and plain TRL gets the same base weights and the same LoRA config through `peft_config`.
  - ftflow: the train stage as its rule runs it (`accelerate launch` of ftflow.train: process
    start, model init, checkpoints, loss curve, summary),
  - TRL: a plain SFTTrainer script in a fresh process, on the same rows with the same
    arguments (checkpoints, logging, threads, gradient checkpointing as configured), nothing else.
Each runs in a fresh process, alternately, `--repeats` times; the best time of each is kept.
It prints tokens/s of the training loop of each (trainer.train() only) and of ftflow's whole
stage, and the ratios (target: ftflow >= 0.95x TRL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers

from helpers import prepared  # noqa: E402


def prepare(work: Path, overrides: list[str]) -> dict:
    """The data normalized and packed in `work` and a pretrained model's base weights in place
    (the tests' helpers.prepared); returns the composed config."""
    from ftflow.config.params import compose

    prepared(work, overrides, with_model=True)  # no weights for the tiny model (trained from scratch)
    return compose(overrides, work / "conf")


def rows_tokens(work: Path, rows: int) -> int:
    """Tokens in the first `rows` packed rows, cycling as the sampler does over epochs."""
    import datasets

    from ftflow import paths

    lengths = [len(r) for r in datasets.load_from_disk(str(work / paths.PACK / "train"))["input_ids"]]
    return sum(lengths[i % len(lengths)] for i in range(rows))


def plain_trl(work: Path, tree: dict) -> None:
    """Seconds of trainer.train() for plain TRL on the same rows and arguments (in a fresh
    process, as ftflow's stage runs in one)."""
    # the threads ftflow's launcher gives its one process (--num_cpu_threads_per_process sets
    # OMP_NUM_THREADS before torch starts): a spawned child would otherwise take torch's default
    os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ftflow import paths

    train, model_cfg, lora = tree["train"], tree["model"], tree["peft"]
    tok = AutoTokenizer.from_pretrained(work / paths.PACK / "tokenizer")
    torch.manual_seed(train["seed"])
    if model_cfg["source"] == "scratch":
        arch = dict(model_cfg["architecture"])
        config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, bos_token_id=None, **arch)  # fmt: skip
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    else:  # the base weights download put in place, in float32 as on any CPU
        model = AutoModelForCausalLM.from_pretrained(work / paths.base_model_dir(model_cfg), dtype=torch.float32,
                                                     attn_implementation="sdpa")  # fmt: skip
    peft_config = None
    if lora["method"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    args = SFTConfig(output_dir=str(work / "trl"), seed=train["seed"], max_steps=train["max_steps"],
                     per_device_train_batch_size=train["per_device_batch_size"], learning_rate=train["learning_rate"],
                     lr_scheduler_type=train["lr_scheduler"], warmup_steps=train["warmup_steps"],
                     logging_steps=train["logging_steps"], save_steps=train["save_steps"],
                     save_total_limit=train["save_total_limit"], use_cpu=True, bf16=False,
                     # SFTConfig turns gradient checkpointing on by default; the config says off
                     gradient_checkpointing=train["gradient_checkpointing"],
                     report_to=[], dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
                     padding_free=True, remove_unused_columns=False)  # fmt: skip
    ds = datasets.load_from_disk(str(work / paths.PACK / "train"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(work / "trl" / "model"))  # the final model, as the stage saves it
    (work / "trl_result.json").write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


def run_trl(work: Path, tree: dict) -> tuple[float, float, int]:
    """(trainer.train() seconds, whole process seconds, torch threads) of plain_trl, in a fresh
    interpreter as ftflow's training process is."""
    import subprocess
    import sys

    (work / "tree.json").write_text(json.dumps(tree))
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--trl-child", str(work)], check=True)
    whole = time.perf_counter() - start
    result = json.loads((work / "trl_result.json").read_text())
    shutil.rmtree(work / "trl", ignore_errors=True)
    return result["seconds"], whole, result["threads"]


def run_ftflow(work: Path, tree: dict) -> tuple[float, float]:
    """(trainer.train() seconds, whole stage seconds) of ftflow's train stage, from scratch."""
    from ftflow import paths, runner
    from ftflow.config.params import stage_params

    shutil.rmtree(work / paths.TRAIN, ignore_errors=True)  # no checkpoint to resume from
    start = time.perf_counter()
    runner.run("train", stage_params(tree, "train"), work)
    stage_s = time.perf_counter() - start
    return json.loads((work / paths.TRAIN / "summary.json").read_text())["train_runtime_s"], stage_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: 60 (tiny), 8 (smollm2)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        return plain_trl(args.trl_child, json.loads((args.trl_child / "tree.json").read_text()))

    work = Path(tempfile.mkdtemp(prefix="ftflow-bench-train-"))
    try:
        # checkpoints and the loss as a real run writes them: every 20 and 10 steps on the tiny
        # model, where a step takes milliseconds; every 4 and 1 on SmolLM2, where it takes seconds
        if args.model == "tiny":
            steps, save, log_every, data, what = args.steps or 60, 20, 10, [], "demo; tiny Llama from scratch"
        else:
            steps, save, log_every = args.steps or 8, 4, 1
            data, what = ["experiment=sms_spam"], "SMS spam; SmolLM2-135M-Instruct, its own template, LoRA r=16"
        overrides = [*data, f"pack.max_length={args.max_length}", f"train.max_steps={steps}",
                     f"train.logging_steps={log_every}", f"train.save_steps={save}"]  # fmt: skip
        tree = prepare(work, overrides)
        batch = tree["train"]["per_device_batch_size"] * tree["train"]["gradient_accumulation_steps"]
        tokens = rows_tokens(work, steps * batch)
        print(f"data: {what}; {tokens:,} tokens in {steps} steps of {batch} packed rows of <= {args.max_length}; "
              f"{os.cpu_count()} cores\n")  # fmt: skip
        print(f"both: checkpoints every {save} steps, loss logged every {log_every}; "
              "ftflow also tracks the run in wandb (offline)\n")  # fmt: skip

        # alternated, twice each, the best kept: the machine's other load shifts both alike
        trl_runs, ftflow_runs = [], []
        for _ in range(args.repeats):
            trl_runs.append(run_trl(work, tree))
            ftflow_runs.append(run_ftflow(work, tree))
        trl_s, trl_whole = min(r[0] for r in trl_runs), min(r[1] for r in trl_runs)
        loop_s, stage_s = min(r[0] for r in ftflow_runs), min(r[1] for r in ftflow_runs)

        print(f"{'':44}{'seconds':>9}{'tokens/s':>11}")
        for name, sec in [("TRL SFTTrainer.train()", trl_s), ("ftflow train stage: trainer.train()", loop_s),
                          ("TRL script: whole (process start to exit)", trl_whole),
                          ("ftflow train stage: whole (launch to exit)", stage_s)]:  # fmt: skip
            print(f"{name:44}{sec:9.2f}{tokens / sec:11,.0f}")
        print(
            f"\ntorch threads: TRL {trl_runs[0][2]}, ftflow {len(os.sched_getaffinity(0))} (its launcher's share of the cores)"
        )
        print(f"ftflow loop / TRL  = {trl_s / loop_s:.2f}x   (target >= 0.95x)")
        print(
            f"ftflow stage / TRL script = {trl_whole / stage_s:.2f}x   (process start, model init and saving included:"
            f" accelerate launch, provenance, wandb)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
