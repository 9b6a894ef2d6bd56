"""The config's schema: a pydantic model per section, forbidding unknown keys, so that a typo
fails before any job runs, naming the key's dotted path:

    ConfigError: invalid config: train.learnin_rate: unknown key

Building these classes costs about 0.1 s, so the Snakefile's parse does not import this module
while params.yaml's last check holds (see config.params.load_checked).
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    model_validator,
)

from ftflow import stages
from ftflow.errors import ConfigError
from ftflow.paths import HOLDOUT


class Section(BaseModel):
    # extra="forbid" is what turns a misspelt key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", strict=False, protected_namespaces=())


# --- data --------------------------------------------------------------------------------


# names become folders and Snakemake wildcard values: keep them to plain file-name characters
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Source(Section):
    name: str = Field(pattern=NAME, description="its folder under data/raw/")
    path: str | None = Field(
        None, description="a local file, directory or glob (data/*.jsonl.gz), or a save_to_disk dir"
    )
    hub: str | None = Field(None, description="a hub dataset repo id (org/name)")
    revision: str | None = Field(None, description="tag, branch or commit sha; pin it for reproducibility")
    files: list[str] | None = Field(None, description="glob patterns of files to take from the source")
    subset: str | None = Field(None, description="hub layout: the config/subset name")
    from_split: str | None = Field(None, description="the source's own split to read (hub layout, saved DatasetDict)")
    split: Literal["train", "validation", "test"] = Field("train", description="which split this source feeds")
    reader: str = Field("alpaca", description="a built-in reader name, or 'file.py:function' (file under conf/data/)")
    columns: dict[str, str] | None = Field(None, description="the reader's field name -> this source's column name")
    system: str | None = Field(None, description="system prompt for records that have none")
    sample_by: Literal["line", "paragraph", "document"] = Field("line", description=".txt files: what one record is")
    shuffle: bool = Field(False, description="shuffle the source's records (seeded) before `limit`")
    seed: int = Field(0, description="the seed of `shuffle`")
    limit: int | None = Field(default=None, ge=1, description="first N records (N random ones with shuffle)")
    weight: float = Field(default=1.0, gt=0, description="mixture weight: < 1 subsamples, > 1 repeats records")
    dedup: bool = Field(False, description="drop exact duplicates (same normalized record)")
    min_chars: int | None = Field(default=None, ge=0, description="length filters on the record's text")
    max_chars: int | None = Field(
        default=None, ge=1, description="length filters on the record's text: the longest kept"
    )

    @model_validator(mode="after")
    def _one_location(self) -> Source:
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"source {self.name!r}: set exactly one of `path` or `hub`")
        return self

    @model_validator(mode="after")
    def _columns_name_reader_fields(self) -> Source:
        from ftflow.data.readers import READER_FIELDS

        fields = READER_FIELDS.get(self.reader)  # a user reader's fields are its own business
        unknown = sorted(set(self.columns or ()) - set(fields or ()))
        if fields and unknown:
            raise ValueError(f"source {self.name!r}: columns maps {unknown}, which reader {self.reader!r} does not "
                             f"read (it reads {list(fields)})")  # fmt: skip
        return self


def _split_size(value: Any) -> Any:
    """A fraction of the training records (0.1) or a count (200), one message for anything else
    (a union type would report each of its members' complaints)."""
    if value is None or isinstance(value, bool):
        return value if value is None else _bad_size(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        _bad_size(value)
    if 0 < number < 1:
        return number
    if number >= 1 and number.is_integer():
        return int(number)
    _bad_size(value)


def _bad_size(value: Any):
    raise ValueError("a fraction between 0 and 1 (0.1) or a count of records (200)")


# data.validation_size / data.test_size
SplitSize = Annotated[int | float | None, BeforeValidator(_split_size)]


class Data(Section):
    kind: Literal["conversation", "preference", "unpaired", "prompt", "text"] = Field(
        "conversation",
        description=(
            "what one record is: a conversation, a preference pair, an unpaired (KTO) example, a prompt "
            "(GRPO) or raw text; one dataset holds one kind"
        ),
    )
    sources: list[Source] = Field(
        min_length=1, description="the datasets to read, each feeding one split (see data.sources[].*)"
    )
    on_error: Literal["raise", "skip"] = Field("raise", description="skip: drop bad records, count per reason")
    max_record_mb: float = Field(default=8.0, gt=0, description="a bigger record is an error, not data")
    num_proc: int | None = Field(default=None, ge=1, description="worker processes (default: the usable cores)")
    validation_size: SplitSize = Field(
        None,
        description=(
            "carve the validation split from the training records: a fraction (0.1) or a count (200); by a hash "
            "of each normalized record, so a record keeps its split when others are added (with a fraction)"
        ),
    )
    test_size: SplitSize = Field(
        None, description="carve the test split (what eval=holdout scores) the same way; see validation_size"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Data:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate source names {dupes}: each source needs its own name")
        if "train" not in {s.split for s in self.sources}:
            raise ValueError("no source feeds the train split")
        return self

    @model_validator(mode="after")
    def _carved_splits(self) -> Data:
        for split, size in self.carved().items():
            feeding = [s.name for s in self.sources if s.split == split]
            if feeding:
                raise ValueError(f"data.{split}_size carves a {split} split from the training records, but source "
                                 f"{feeding[0]!r} feeds {split} already: set one or the other")  # fmt: skip
        fractions = [size for size in self.carved().values() if isinstance(size, float)]
        if sum(fractions) >= 1:
            raise ValueError(f"data.validation_size + data.test_size = {sum(fractions):g} leaves no training record")
        return self

    def carved(self) -> dict[str, int | float]:
        """{split: size} of the splits carved from the training records."""
        sizes = {"validation": self.validation_size, "test": self.test_size}
        return {split: size for split, size in sizes.items() if size is not None}

    def has_split(self, split: str) -> bool:
        return split in self.carved() or any(s.split == split for s in self.sources)

    @model_validator(mode="after")
    def _readers_fit_kind(self) -> Data:
        from ftflow.data.readers import reader_kind

        for s in self.sources:
            try:
                kind = reader_kind(s.reader)
            except ValueError as err:
                raise ValueError(f"source {s.name!r}: {err}") from None
            if kind not in (None, self.kind):
                raise ValueError(
                    f"source {s.name!r}: reader {s.reader!r} yields {kind} records but data.kind is "
                    f"{self.kind}; set data.kind={kind} (one dataset holds one kind)"
                )
        return self


# --- model / tokenizer / template ------------------------------------------------------


class Model(Section):
    name: str = Field(pattern=NAME, description="folder name under data/models/")
    source: Literal["hub", "local", "gguf", "scratch"] = Field(
        description=(
            "hub: a hub repo; local: an HF model directory; gguf: a .gguf file (llama.cpp's format), "
            "converted once into an HF directory by download; scratch: initialised by train"
        )
    )
    hub_id: str | None = Field(None, description="source=hub: the model's repo id (org/name)")
    revision: str | None = Field(None, description="source=hub: tag, branch or commit sha; pin it for reproducibility")
    path: str | None = Field(
        None,
        description=(
            "local: a directory; gguf: a .gguf file, or pkg:<package>/<file> for one inside an installed package"
        ),
    )
    architecture: dict[str, Any] | None = Field(None, description="scratch: transformers config kwargs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "the weights' dtype in training; auto: bfloat16 when training runs in bf16 (train.bf16 "
            "resolves true: a GPU that has it), else float32 (so always float32 on CPU)"
        ),
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "auto",
        description=(
            "auto: flash_attention_2 on a GPU with flash-attn installed, else sdpa (train/worker.py); "
            "sdpa, eager and flex_attention keep packed conversations apart by their position ids"
        ),
    )
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (off: a model that needs it fails to load)"
    )

    @model_validator(mode="after")
    def _mode_fields(self) -> Model:
        needed = {"hub": "hub_id", "local": "path", "gguf": "path", "scratch": "architecture"}[self.source]
        if getattr(self, needed) is None:
            raise ValueError(f"model.source={self.source} needs model.{needed}")
        if self.source == "gguf" and not self.path.endswith(".gguf"):
            raise ValueError(f"model.source=gguf needs model.path to name a .gguf file (got {self.path!r})")
        return self


class Tokenizer(Section):
    source: Literal["model", "train"] = Field(description="take the base model's tokenizer, or train one (scratch)")
    vocab_size: int = Field(default=512, ge=64, description="source=train: the trained tokenizer's vocabulary size")
    min_frequency: int = Field(
        default=2, ge=1, description="source=train: a merge must occur this often to enter the vocabulary"
    )


class Template(Section):
    name: Literal["chatml", "llama3", "model"] = Field(
        description="ours (src/ftflow/pack/templates/) or the tokenizer's own"
    )
    eos_token: str | None = Field("<|im_end|>", description="ends each turn; the generation eos (None: tokenizer's)")


# --- pack / train / peft / launcher ----------------------------------------------------


class Pack(Section):
    max_length: int = Field(ge=16, description="tokens per packed row (and the longest sequence: see overflow)")
    strategy: Literal["bfd", "none"] = Field(
        "bfd", description="bfd: best-fit-decreasing rows; none: a sequence per row"
    )
    overflow: Literal["auto", "truncate", "drop", "split"] = Field(
        "auto",
        description=(
            "sequences longer than max_length; auto: split raw text (a document is not a sample to cut "
            "short), truncate conversations (keep the start)"
        ),
    )
    train_on: Literal["auto", "assistant", "each_turn", "last_assistant", "all"] = Field(
        "auto",
        description=(
            "which tokens carry loss; auto: assistant turns, in the whole conversation where the template renders "
            "it exactly, else one sequence per turn (each_turn)"
        ),
    )
    num_proc: int | None = Field(default=None, ge=1, description="worker processes (default: the usable cores)")


class Dpo(Section):
    beta: float = Field(default=0.1, gt=0, description="how far the policy may move from the reference")
    loss_type: str = Field("sigmoid", description="TRL's DPO loss: sigmoid, ipo, hinge, robust, ...")


class Kto(Section):
    beta: float = Field(default=0.1, gt=0, description="how far the policy may move from the reference")
    desirable_weight: float = Field(default=1.0, gt=0, description="loss weight of the desirable (label true) examples")
    undesirable_weight: float = Field(
        default=1.0, gt=0, description="loss weight of the undesirable (label false) examples"
    )


class Reward(Section):
    name: str = Field(
        description="a built-in (src/ftflow/train/rewards.py) or 'file.py:function' (file under conf/train/)"
    )
    weight: float = Field(1.0, description="this reward's weight in the sum of rewards")
    pattern: str | None = Field(
        None, description="regex_match: the answer is the pattern's first group in the completion"
    )


class Grpo(Section):
    rewards: list[Reward] = Field(min_length=1, description="the reward functions, summed with their weights")
    num_generations: int = Field(default=4, ge=2, description="completions per prompt (the group)")
    max_completion_length: int = Field(default=32, ge=1, description="the longest generated completion, in tokens")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature of the generations")
    beta: float = Field(default=0.0, ge=0, description="KL penalty to the reference model (0: no reference)")


# which data kind each trainer consumes (pack writes one layout per kind)
TRAINER_KIND = {"sft": ("conversation", "text"), "dpo": ("preference",), "kto": ("unpaired",), "grpo": ("prompt",)}


class Train(Section):
    method: Literal["sft", "dpo", "kto", "grpo"] = Field("sft", description="the TRL trainer")
    seed: int = Field(0, description="seed of initialisation, data order and dropout")
    epochs: float = Field(gt=0, description="passes over the training data (max_steps > 0 overrides it)")
    max_steps: int = Field(
        -1, description="stop after this many optimizer steps (a quick try: 3); -1: train for epochs"
    )
    per_device_batch_size: int = Field(ge=1, description="packed rows (or pairs, prompts) per process per step")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="steps whose gradients add up before one optimizer update"
    )
    learning_rate: float = Field(gt=0, description="the optimizer's (AdamW's) peak learning rate")
    lr_scheduler: str = Field(
        "cosine", description="transformers' learning-rate schedule after warmup: cosine, linear, constant, ..."
    )
    warmup_steps: float = Field(
        default=0.0, ge=0, description="steps of linear learning-rate warmup; < 1: a fraction of all steps"
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, description="gradients are clipped to this global norm")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="train in bfloat16 mixed precision; auto: on a GPU that supports it, never on CPU"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, about a third more compute"
    )
    # speed-ups measured by benchmarks/gpu/bench.py (README: GPU)
    liger_kernel: bool = Field(
        False,
        description=(
            "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, and a cross-entropy fused with the output "
            "layer that never holds the whole logits); needs a CUDA GPU and liger-kernel"
        ),
    )
    torch_compile: bool = Field(False, description="torch.compile the model (minutes of compilation at the start)")
    logging_steps: int = Field(
        default=10,
        ge=1,
        description=(
            "a row of the loss curve (results/train/loss.csv) every N steps; the first and last steps are always logged"
        ),
    )
    save_steps: int = Field(
        default=500,
        ge=1,
        description="a checkpoint every N steps; also on a stop signal (SIGUSR1/SIGTERM: preemption; SIGINT: Ctrl-C)",
    )
    save_total_limit: int = Field(
        default=2, ge=1, description="checkpoints kept per config (the oldest are removed; keep=best's is never)"
    )
    eval_steps: int | None = Field(
        default=None,
        ge=0,
        description=(
            "a pass over the validation split (when it has rows) every eval_steps; None: at each save "
            "(where a best checkpoint is chosen), 0: never. Its first eval_rows packed rows only: cheap"
        ),
    )
    eval_rows: int = Field(
        default=256, ge=1, description="the validation pass reads the first N packed rows of the validation split"
    )
    keep: Literal["last", "best"] = Field(
        "last",
        description=(
            "which weights train/model holds: the last step's, or those of the best validation pass (by "
            "the validation metric best_metric; lower is better unless greater_is_better), which "
            "save_total_limit never rotates away. early_stopping_patience: stop after that many passes "
            "without improvement (keep=best)"
        ),
    )
    best_metric: str = Field(
        "loss", description="keep=best: the validation metric that chooses (loss, or a trainer's reward metric)"
    )
    greater_is_better: bool = Field(False, description="keep=best: a higher best_metric is better (default: lower)")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="keep=best: stop after this many validation passes without improvement"
    )
    checkpoint_verify: Literal["size", "sha256"] = Field(
        "size",
        description=(
            "what a resume checks of a checkpoint's files against what was recorded when it was saved: "
            "their sizes (free), or their sha256 too (each save then reads back every file it wrote)"
        ),
    )
    resume: bool = Field(
        True,
        description=(
            "a rerun (after a stop signal, Ctrl-C, a crash) goes on from the last complete checkpoint of "
            "the same config; false removes them first and trains from step 0"
        ),
    )
    dpo: Dpo = Field(Dpo(), description="method=dpo's settings")
    kto: Kto = Field(Kto(), description="method=kto's settings")
    grpo: Grpo | None = Field(None, description="method=grpo's settings (its rewards are required)")

    @model_validator(mode="after")
    def _grpo_rewards(self) -> Train:
        if self.method == "grpo" and self.grpo is None:
            raise ValueError("train.method=grpo needs train.grpo.rewards (see conf/train/grpo.yaml)")
        return self

    @model_validator(mode="after")
    def _best(self) -> Train:
        if self.keep == "best" and self.eval_steps == 0:
            raise ValueError("train.keep=best chooses by validation passes: train.eval_steps=0 turns them off")
        if self.keep == "best" and self.eval_steps and self.save_steps % self.eval_steps:
            # a checkpoint is only kept where a validation pass judged it
            raise ValueError(f"train.keep=best needs save_steps ({self.save_steps}) to be a multiple of "
                             f"eval_steps ({self.eval_steps})")  # fmt: skip
        if self.early_stopping_patience is not None and self.keep != "best":
            raise ValueError(
                "train.early_stopping_patience stops at the best validation pass: it needs train.keep=best"
            )
        return self


class Peft(Section):
    method: Literal["none", "lora", "qlora"] = Field(description="qlora: LoRA over a 4-bit base (CUDA + bitsandbytes)")
    r: int = Field(default=8, ge=1, description="LoRA rank: the adapters' inner dimension")
    alpha: int = Field(default=16, ge=1, description="LoRA scaling: the adapters' output is multiplied by alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | str = Field(
        "all-linear", description="the layers that get adapters: all-linear, or a list of module names (q_proj, ...)"
    )
    modules_to_save: list[str] | None = Field(None, description="trained in full beside the adapters (e.g. [lm_head])")


class DeepSpeed(Section):
    zero_stage: Literal[2, 3] = Field(3, description="2 shards optimizer states and gradients; 3 the parameters too")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="optimizer states in host memory")
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-3 only: parameters in host memory")
    gather_weights_on_save: bool = Field(
        False,
        description=(
            "ZeRO-3: gather the full weights into one process at the final save (it must hold the whole "
            "model); false leaves the shards and consolidate gathers them on CPU (adapters are always "
            "gathered: they are small)"
        ),
    )


class Fsdp(Section):
    sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = Field(
        "FULL_SHARD",
        description=(
            "what FSDP shards: FULL_SHARD (everything), SHARD_GRAD_OP (not the parameters), HYBRID_SHARD "
            "(within a node), NO_SHARD (DDP)"
        ),
    )
    cpu_offload: bool = Field(False, description="keep parameters in host memory between uses")


class Launcher(Section):
    name: Literal["accelerate"] = Field("accelerate", description="the launcher program (accelerate launch)")
    distributed: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="how several processes share the work: none (one process), ddp, fsdp, deepspeed"
    )
    num_processes: int = Field(default=1, ge=1, description="per node: one per GPU (or CPU worker)")
    nodes: int = Field(default=1, ge=1, description="> 1: rank and head address come from Slurm")
    cpu: bool = Field(True, description="force CPU even when an accelerator is visible")
    main_process_port: int | None = Field(default=None, ge=1024, le=65535, description="None: a free one")
    collective_timeout_s: int = Field(default=600, ge=1, description="a lost peer fails the others after this")
    deepspeed: DeepSpeed = Field(DeepSpeed(), description="distributed=deepspeed's settings")
    fsdp: Fsdp = Field(Fsdp(), description="distributed=fsdp's settings")

    @model_validator(mode="after")
    def _processes(self) -> Launcher:
        if self.distributed == "none" and self.num_processes * self.nodes > 1:
            raise ValueError("launcher.distributed=none runs one process: pick ddp, fsdp or deepspeed")
        if self.deepspeed.offload_params != "none" and self.deepspeed.zero_stage != 3:
            raise ValueError("launcher.deepspeed.offload_params needs zero_stage 3")
        if self.distributed == "fsdp" and self.cpu:
            # accelerate runs FSDP on accelerators only; on CPU it would quietly train DDP
            raise ValueError("launcher.distributed=fsdp needs GPUs (launcher.cpu=false); on CPU use ddp or deepspeed")
        return self


class Tracking(Section):
    backend: Literal["wandb", "none"] = Field("wandb", description="wandb (offline unless a key is configured) or none")
    project: str = Field("ftflow", description="the wandb project")
    group: str | None = Field(None, description="None: the DVC experiment name when run by `dvc exp run`")
    name: str | None = Field(None, description="None: <method>-<peft>-<config fingerprint>")
    tags: list[str] = Field([], description="wandb run tags")
    mode: Literal["auto", "offline", "online", "disabled"] = Field(
        "auto", description="auto: online when a key is configured"
    )


class Consolidate(Section):
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="of the written weights")
    max_shard_size: str = Field(
        "5GB", description="the largest safetensors file written (the weights are split beyond it)"
    )
    verify_tolerance: float | None = Field(
        default=None,
        gt=0,
        description=(
            "largest |log p| difference allowed on the probe, in both checks (the trained weights vs what"
            " train recorded, at the training precision; the merged model vs the unmerged one, in "
            "float32). None: 1e-3 where both sides are float32, else 3x what 16-bit rounding does to this"
            " model on the probe (at least 0.1)"
        ),
    )


class EvalDataset(Section):
    """A hub dataset an lm-eval built-in task reads (its YAML's dataset_path and dataset_name),
    fetched by download on the login node into data/eval/, which evaluate reads offline."""

    hub: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="dataset_path, e.g. openai/gsm8k")
    name: str | None = Field(None, description="dataset_name (the hub config), e.g. main")
    revision: str | None = Field(None, description="tag, branch or commit; the manifest records the commit taken")


class Contamination(Section):
    """Which evaluation examples also occur in the training data (ftflow.contamination)."""

    check: bool = Field(True, description="count them (results/eval/contamination.json); false: skip the check")
    ngram: int = Field(
        13, ge=1, description="words in a shared run that counts as overlap (an example shorter than that: all of it)"
    )
    flag_above: float = Field(
        0.0, ge=0, lt=1, description="flag a task when more than this share of its examples overlap (0: any)"
    )


class Eval(Section):
    tasks: list[str] = Field(
        description=(
            "task names: holdout (your test split, answered and scored; eval=holdout), a YAML of conf/eval/tasks/, "
            "else one of lm-eval's built-in tasks or groups; [] evaluates nothing (eval=none)"
        ),
    )
    limit: int | None = Field(default=None, ge=1, description="evaluate the first N examples of each task (null: all)")
    num_fewshot: Annotated[int, Field(ge=0)] | dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        0,
        description=(
            "few-shot examples: one number for every task, {task: number} per task (the others their "
            "task's own default), or null for every task's own default"
        ),
    )
    batch_size: int = Field(default=16, ge=1, description="examples per forward pass")
    max_gen_toks: int | None = Field(default=32, ge=1, description="null: each task's own limit")
    datasets: list[EvalDataset] = Field([], description="the built-in tasks' hub data (see EvalDataset)")
    apply_chat_template: bool = Field(
        True,
        description=("render each prompt with the model's chat template, as a chat (lm-eval's apply_chat_template)"),
    )
    seed: int = Field(0, description="lm-eval's random, numpy and torch seeds (few-shot sampling)")
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vLLM when installed and a GPU is there")
    contamination: Contamination = Field(
        Contamination(), description="eval examples that also occur in the training data (see contamination.*)"
    )
    models: dict[str, str] | None = Field(
        None,
        description=(
            "label -> HF model directory (with its tokenizer) to evaluate instead of the pipeline's base "
            "and tuned models: `ftflow evaluate 'eval.models={mine: /models/x}'`"
        ),
    )


class SlurmJob(Section):
    """One stage's Slurm job (profiles/slurm). None: the top-level value, or the cluster's
    default. GPUs and nodes of the train job are not here: they come from launcher."""

    partition: str | None = Field(None, description="the job's partition (null: slurm.partition)")
    account: str | None = Field(None, description="the job's account (null: slurm.account)")
    qos: str | None = Field(None, description="the job's quality of service (null: slurm.qos)")
    constraint: str | None = Field(None, description="the job's node features (null: slurm.constraint)")
    cpus: int | None = Field(default=None, ge=1, description="CPUs per task (train: per node)")
    mem_mb: int | None = Field(default=None, ge=1, description="memory per node, in MB")
    runtime: int | None = Field(default=None, ge=1, description="the job's time limit, in minutes")
    gpus: int | None = Field(
        default=None,
        ge=0,
        description=(
            "GPUs per node (--gres=gpu:N; evaluate runs its models on one when it has one); not for "
            "train, whose GPUs come from launcher"
        ),
    )


class Slurm(Section):
    """Each stage's Slurm job: values for every job, and per stage (jobs)."""

    partition: str | None = Field(None, description="the partition of every stage's job unless its job says otherwise")
    account: str | None = Field(
        None, description="the account every stage's job is charged to unless its job says otherwise"
    )
    qos: str | None = Field(None, description="quality of service of every stage's job unless its job says otherwise")
    constraint: str | None = Field(
        None, description="node features (--constraint) of every stage's job unless its job says otherwise"
    )
    stop_signal_s: int = Field(
        default=300,
        ge=1,
        description=(
            "train asks for SIGTERM this long before its time limit: it checkpoints, exits, and the "
            "profile's retry resumes it (Slurm sends SIGTERM at the limit too, but only KillWait before "
            "SIGKILL)"
        ),
    )
    runtime_growth: float = Field(
        default=1.0,
        ge=1.0,
        description="a retried job asks for runtime x runtime_growth^(attempt-1): more time after a time limit",
    )
    jobs: dict[Literal[stages.SLURM_JOBS], SlurmJob] = Field(  # type: ignore[valid-type]  # (a tuple: the same as listing them)
        {}, description="a stage's own job settings, by stage name (slurm.jobs.train.runtime=600)"
    )

    @model_validator(mode="after")
    def _train_job(self) -> Slurm:
        train = self.jobs.get("train") or SlurmJob()
        if train.gpus is not None:
            raise ValueError("slurm.jobs.train.gpus: the train job's GPUs come from launcher (launcher=gpu, "
                             "launcher.num_processes: GPUs per node), so that the request and the launch agree")  # fmt: skip
        if train.runtime is not None and train.runtime * 60 <= self.stop_signal_s:
            raise ValueError(f"slurm.jobs.train.runtime={train.runtime} minutes is not longer than slurm.stop_signal_s="
                             f"{self.stop_signal_s} s, the warning train gets before its time limit: it would "
                             "checkpoint at once, every time; give it more time or a shorter stop_signal_s")  # fmt: skip
        return self


class Config(Section):
    conf_digest: str | None = Field(None, description="which conf/ this tree was composed from (see conf_digest())")
    data: Data = Field(description="the training data: sources, their readers and the record kind (conf/data/)")
    model: Model = Field(description="the base model: hub, local directory, GGUF file or scratch (conf/model/)")
    tokenizer: Tokenizer = Field(description="the model's own tokenizer, or one trained on the data (conf/tokenizer/)")
    template: Template = Field(description="the chat template conversations are rendered with (conf/template/)")
    pack: Pack = Field(description="tokenization, loss masks and packing into rows (conf/pack/)")
    train: Train = Field(description="the trainer and its optimisation (conf/train/)")
    peft: Peft = Field(description="full fine-tuning, LoRA or QLoRA (conf/peft/)")
    launcher: Launcher = Field(description="processes, nodes and distribution of training (conf/launcher/)")
    tracking: Tracking = Field(description="experiment tracking (conf/tracking/)")
    consolidate: Consolidate = Field(description="the final model directory and its check (conf/consolidate/)")
    eval: Eval = Field(description="the lm-eval tasks and settings (conf/eval/)")
    slurm: Slurm = Field(
        Slurm(),
        description=(
            "each stage's Slurm job under profiles/slurm (conf/slurm/); read by the rules' resources "
            "only: no stage reruns when it changes"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.model.source == "scratch" and self.tokenizer.source == "model":
            raise ValueError("model.source=scratch has no tokenizer of its own: use tokenizer=train")
        if self.template.name == "model" and self.tokenizer.source == "train":
            raise ValueError(
                "a trained tokenizer has no chat template of its own: for the model's own template add "
                "tokenizer=model (its tokenizer, with the template), or use template=chatml"
            )
        if HOLDOUT in self.eval.tasks:
            self._holdout_data()
        kinds = TRAINER_KIND[self.train.method]
        if self.data.kind not in kinds:
            raise ValueError(
                f"train.method={self.train.method} trains on {' or '.join(kinds)} data but data.kind is "
                f"{self.data.kind} (train={self.train.method} selects its demo data; pick data= to match)"
            )
        return self

    def _holdout_data(self) -> None:
        """The holdout task answers conversations of the test split: there must be one."""
        if self.data.kind != "conversation":
            raise ValueError(f"eval task {HOLDOUT!r} answers conversations and scores the last assistant turn, but "
                             f"data.kind is {self.data.kind}: choose eval= tasks of your own (or eval=none)")  # fmt: skip
        if not self.data.has_split("test"):
            raise ValueError(f"eval task {HOLDOUT!r} scores your test split, and your data has none: carve one "
                             "from the training records with data.test_size=0.1 (or a count), or add a source "
                             "with split: test")  # fmt: skip


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate(tree: dict[str, Any]) -> Config:
    """Validate a composed tree; every problem is reported with its dotted key path."""
    return _validated(Config, tree, "invalid config")


class StageConfig(Section):
    """One stage's config sections (its registry entry's `sections`), validated once as the
    stage starts (runner.run_rule): the stage reads typed attributes (`cfg.train.learning_rate`) and
    records `cfg.sections`, the sections as it was given them, beside its outputs (its
    config.yaml, train's checkpoint key and provenance)."""

    _sections: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def sections(self) -> dict[str, Any]:
        return self._sections


@functools.cache
def stage_class(stage: str) -> type[StageConfig]:
    """The typed config of a stage: a field per section it reads, each of the Config's type."""
    fields = {name: (Config.model_fields[name].annotation, ...) for name in stages.BY_NAME[stage].sections}
    return create_model(f"{stage.title()}Config", __base__=StageConfig, **fields)


def stage_config(stage: str, sections: dict[str, Any]) -> StageConfig:
    """A stage's sections, validated (problems named by their dotted key path)."""
    cfg = _validated(stage_class(stage), sections, f"invalid {stage} config")
    cfg._sections = sections
    return cfg


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """did_you_mean in the notation of the message it ends (data.sources[0].reader)."""
    return re.sub(r"\.(\d+)(?=[.?])", r"[\1]", did_you_mean(".".join(map(str, loc))))


def _validated(model: type[BaseModel], tree: dict[str, Any], what: str):
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            what_is_wrong = "unknown key" + _did_you_mean(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
            what_is_wrong = what_is_wrong.removeprefix("Value error, ")  # pydantic's, before our own reason
            if e["type"] == "missing":
                what_is_wrong = "missing required value"
            path = _dotted(e["loc"])
            # a section's own check (kind vs trainer, ...) gets the whole section as its input: the
            # reason names the keys, a dump of the section would bury it
            quiet = e["type"] in ("extra_forbidden", "missing") or isinstance(e["input"], (dict, list))
            got = "" if quiet else f" (got {e['input']!r})"
            lines.append(f"  {path + ': ' if path else ''}{what_is_wrong}{got}")
        raise ConfigError(f"{what}:\n" + "\n".join(lines)) from None


# --- a key by its dotted path: the section it lies in, and the closest real one ---------------


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (itself, optional, or the items of a list or dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict):
        found = [m for a in typing.get_args(annotation) if (m := model_of(a))]
        return found[0] if found else None
    return None


def did_you_mean(key: str) -> str:
    """' — did you mean train.learning_rate?' for a key the schema does not have, '' when
    nothing is close. `key` is dotted as an override writes it (data.sources.0.pth)."""
    return _closest(Config, key.split("."), [])


def _closest(model: type[BaseModel], parts: list[str], fixed: list[str]) -> str:
    if not parts:
        return ""
    part, rest = parts[0], parts[1:]
    if part not in model.model_fields:
        close = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.6)
        return f" — did you mean {'.'.join([*fixed, close[0], *rest])}?" if close else ""
    annotation = model.model_fields[part].annotation
    inner = model_of(annotation)
    if inner is None or not rest:
        return ""
    if typing.get_origin(annotation) is dict or rest[0].isdigit():  # past a map's key or a list's index
        return _closest(inner, rest[1:], [*fixed, part, rest[0]])
    return _closest(inner, rest, [*fixed, part])


def known_key(key: str) -> bool:
    """Whether the schema has this dotted key (data.sources.0.reader), set in conf/ or not."""
    model: type[BaseModel] | None = Config
    parts = key.split(".")
    i = 0
    while i < len(parts):
        if model is None or parts[i] not in model.model_fields:
            return False
        annotation = model.model_fields[parts[i]].annotation
        model = model_of(annotation)
        i += 1
        if model is not None and i < len(parts) and (typing.get_origin(annotation) is dict or parts[i].isdigit()):
            i += 1  # past a map's key or a list's index
    return True
