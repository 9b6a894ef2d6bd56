"""The config's schema: a pydantic model per section, forbidding unknown keys, so that a typo
fails before any job runs, naming the key's dotted path:

    ConfigError: invalid config: train.learnin_rate: unknown key

Building these classes costs about 0.1 s, so the Snakefile's parse does not import this module
while params.yaml's last check holds (see config.params.load_checked).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, model_validator

from ftflow import stages
from ftflow.errors import ConfigError


class Section(BaseModel):
    # extra="forbid" is what turns a misspelt key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", strict=False, protected_namespaces=())


# --- data --------------------------------------------------------------------------------


# names become folders and Snakemake wildcard values: keep them to plain file-name characters
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Source(Section):
    name: str = Field(pattern=NAME)  # its folder under data/raw/
    path: str | None = None  # a local file, directory or glob (data/*.jsonl.gz), or a save_to_disk dir
    hub: str | None = None  # a hub dataset repo id (org/name)
    revision: str | None = None  # tag, branch or commit sha; pin it for reproducibility
    files: list[str] | None = None  # glob patterns of files to take from the source
    subset: str | None = None  # hub layout: the config/subset name
    from_split: str | None = None  # the source's own split to read (hub layout, saved DatasetDict)
    split: Literal["train", "validation", "test"] = "train"  # which split this source feeds
    reader: str = "alpaca"  # a built-in reader name, or "file.py:function" (file under conf/data/)
    columns: dict[str, str] | None = None  # the reader's field name -> this source's column name
    system: str | None = None  # system prompt for records that have none
    sample_by: Literal["line", "paragraph", "document"] = "line"  # .txt files: what one record is
    shuffle: bool = False  # shuffle the source's records (seeded) before `limit`
    seed: int = 0
    limit: int | None = Field(default=None, ge=1)  # first N records (N random ones with shuffle)
    weight: float = Field(default=1.0, gt=0)  # mixture weight: < 1 subsamples, > 1 repeats records
    dedup: bool = False  # drop exact duplicates (same normalized record)
    min_chars: int | None = Field(default=None, ge=0)  # length filters on the record's text
    max_chars: int | None = Field(default=None, ge=1)

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


class Data(Section):
    kind: Literal["conversation", "preference", "unpaired", "prompt", "text"] = "conversation"
    sources: list[Source] = Field(min_length=1)
    on_error: Literal["raise", "skip"] = "raise"  # skip: drop bad records, count per reason
    max_record_mb: float = Field(default=8.0, gt=0)  # a bigger record is an error, not data
    num_proc: int | None = Field(default=None, ge=1)  # worker processes (default: the usable cores)

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
    name: str = Field(pattern=NAME)  # folder name under data/models/
    # hub: a hub repo; local: an HF model directory; gguf: a .gguf file (llama.cpp's format),
    # converted once into an HF directory by download; scratch: initialised by train
    source: Literal["hub", "local", "gguf", "scratch"]
    hub_id: str | None = None
    revision: str | None = None
    # local: a directory; gguf: a .gguf file, or pkg:<package>/<file> for one inside an installed package
    path: str | None = None
    architecture: dict[str, Any] | None = None  # scratch: transformers config kwargs
    # the weights' dtype in training; auto: bfloat16 when training runs in bf16 (train.bf16
    # resolves true: a GPU that has it), else float32 (so always float32 on CPU)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: flash_attention_2 on a GPU with flash-attn installed, else sdpa (train/worker.py);
    # sdpa, eager and flex_attention keep packed conversations apart by their position ids
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _mode_fields(self) -> Model:
        needed = {"hub": "hub_id", "local": "path", "gguf": "path", "scratch": "architecture"}[self.source]
        if getattr(self, needed) is None:
            raise ValueError(f"model.source={self.source} needs model.{needed}")
        if self.source == "gguf" and not self.path.endswith(".gguf"):
            raise ValueError(f"model.source=gguf needs model.path to name a .gguf file (got {self.path!r})")
        return self


class Tokenizer(Section):
    source: Literal["model", "train"]  # take the base model's tokenizer, or train one (scratch)
    vocab_size: int = Field(default=512, ge=64)
    min_frequency: int = Field(default=2, ge=1)


class Template(Section):
    name: Literal["chatml", "llama3", "model"]  # ours (src/ftflow/pack/templates/) or the tokenizer's own
    eos_token: str | None = "<|im_end|>"  # ends each turn; the generation eos (None: tokenizer's)


# --- pack / train / peft / launcher ----------------------------------------------------


class Pack(Section):
    max_length: int = Field(ge=16)
    strategy: Literal["bfd", "none"] = "bfd"  # bfd: best-fit-decreasing rows; none: a sequence per row
    # sequences longer than max_length; auto: split raw text (a document is not a sample to cut
    # short), truncate conversations (keep the start)
    overflow: Literal["auto", "truncate", "drop", "split"] = "auto"
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"  # which tokens carry loss
    num_proc: int | None = Field(default=None, ge=1)  # worker processes (default: the usable cores)


class Dpo(Section):
    beta: float = Field(default=0.1, gt=0)  # how far the policy may move from the reference
    loss_type: str = "sigmoid"  # TRL's DPO loss: sigmoid, ipo, hinge, robust, ...


class Kto(Section):
    beta: float = Field(default=0.1, gt=0)
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)


class Reward(Section):
    name: str  # a built-in (src/ftflow/train/rewards.py) or "file.py:function" (file under conf/train/)
    weight: float = 1.0
    pattern: str | None = None  # regex_match: the answer is the pattern's first group in the completion


class Grpo(Section):
    rewards: list[Reward] = Field(min_length=1)
    num_generations: int = Field(default=4, ge=2)  # completions per prompt (the group)
    max_completion_length: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.0, ge=0)  # KL penalty to the reference model (0: no reference)


# which data kind each trainer consumes (pack writes one layout per kind)
TRAINER_KIND = {"sft": ("conversation", "text"), "dpo": ("preference",), "kto": ("unpaired",), "grpo": ("prompt",)}


class Train(Section):
    method: Literal["sft", "dpo", "kto", "grpo"] = "sft"  # the TRL trainer
    seed: int = 0
    epochs: float = Field(gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(gt=0)
    lr_scheduler: str = "cosine"
    warmup_steps: float = Field(default=0.0, ge=0)  # < 1: a fraction of all steps
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = 1.0
    bf16: bool | Literal["auto"] = "auto"  # auto: on a GPU that supports it, never on CPU
    gradient_checkpointing: bool = False
    # speed-ups measured by benchmarks/gpu/bench.py (README: GPU): Liger's Triton kernels (RMSNorm,
    # RoPE, SwiGLU, and a cross-entropy fused with the output layer that never holds the whole
    # logits; needs a CUDA GPU and liger-kernel), and torch.compile of the model
    liger_kernel: bool = False
    torch_compile: bool = False
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int = Field(default=500, ge=1)  # also saved on SIGUSR1/SIGTERM (preemption)
    save_total_limit: int = Field(default=2, ge=1)
    # a pass over the validation split (when it has rows) every eval_steps; None: at each save
    # (where a best checkpoint is chosen), 0: never. Its first eval_rows packed rows only: cheap
    eval_steps: int | None = Field(default=None, ge=0)
    eval_rows: int = Field(default=256, ge=1)
    # which weights train/model holds: the last step's, or those of the best validation pass (by
    # the validation metric best_metric; lower is better unless greater_is_better), which
    # save_total_limit never rotates away. early_stopping_patience: stop after that many passes
    # without improvement (keep=best)
    keep: Literal["last", "best"] = "last"
    best_metric: str = "loss"
    greater_is_better: bool = False
    early_stopping_patience: int | None = Field(default=None, ge=1)
    # what a resume checks of a checkpoint's files against what was recorded when it was saved:
    # their sizes (free), or their sha256 too (each save then reads back every file it wrote)
    checkpoint_verify: Literal["size", "sha256"] = "size"
    dpo: Dpo = Dpo()
    kto: Kto = Kto()
    grpo: Grpo | None = None

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
    method: Literal["none", "lora", "qlora"]  # qlora: LoRA over a 4-bit base (CUDA + bitsandbytes)
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None  # trained in full beside the adapters (e.g. [lm_head])


class DeepSpeed(Section):
    zero_stage: Literal[2, 3] = 3
    offload_optimizer: Literal["none", "cpu"] = "none"  # optimizer states in host memory
    offload_params: Literal["none", "cpu"] = "none"  # ZeRO-3 only: parameters in host memory
    # ZeRO-3: gather the full weights into one process at the final save (it must hold the
    # whole model); false leaves the shards and consolidate gathers them on CPU (adapters are
    # always gathered: they are small)
    gather_weights_on_save: bool = False


class Fsdp(Section):
    sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    cpu_offload: bool = False


class Launcher(Section):
    name: Literal["accelerate"] = "accelerate"
    distributed: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    num_processes: int = Field(default=1, ge=1)  # per node: one per GPU (or CPU worker)
    nodes: int = Field(default=1, ge=1)  # > 1: rank and head address come from Slurm
    cpu: bool = True  # force CPU even when an accelerator is visible
    main_process_port: int | None = Field(default=None, ge=1024, le=65535)  # None: a free one
    collective_timeout_s: int = Field(default=600, ge=1)  # a lost peer fails the others after this
    deepspeed: DeepSpeed = DeepSpeed()
    fsdp: Fsdp = Fsdp()

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
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "ftflow"
    group: str | None = None  # None: the DVC experiment name when run by `dvc exp run`
    name: str | None = None  # None: <method>-<peft>-<config fingerprint>
    tags: list[str] = []
    mode: Literal["auto", "offline", "online", "disabled"] = "auto"  # auto: online when a key is configured


class Consolidate(Section):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the written weights
    max_shard_size: str = "5GB"
    # largest |log p| difference allowed on the probe, in both checks (the trained weights vs
    # what train recorded, at the training precision; the merged model vs the unmerged one, in
    # float32). None: 1e-3 where both sides are float32, else 3x what 16-bit rounding does to
    # this model on the probe (at least 0.1)
    verify_tolerance: float | None = Field(default=None, gt=0)


class EvalDataset(Section):
    """A hub dataset an lm-eval built-in task reads (its YAML's dataset_path and dataset_name),
    fetched by download on the login node into data/eval/, which evaluate reads offline."""

    hub: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")  # dataset_path, e.g. openai/gsm8k
    name: str | None = None  # dataset_name (the hub config), e.g. main
    revision: str | None = None  # tag, branch or commit; the manifest records the commit taken


class Eval(Section):
    # task names: a YAML of conf/eval/tasks/, else one of lm-eval's built-in tasks or groups
    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)
    # few-shot examples: one number for every task, {task: number} per task (the others their
    # task's own default), or null for every task's own default
    num_fewshot: Annotated[int, Field(ge=0)] | dict[str, Annotated[int, Field(ge=0)]] | None = 0
    batch_size: int = Field(default=16, ge=1)
    max_gen_toks: int | None = Field(default=32, ge=1)  # null: each task's own limit
    datasets: list[EvalDataset] = []  # the built-in tasks' hub data (see EvalDataset)
    apply_chat_template: bool = True
    seed: int = 0
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vLLM when installed and a GPU is there
    # label -> HF model directory (with its tokenizer) to evaluate instead of the pipeline's
    # base and tuned models: `ftflow evaluate 'eval.models={mine: /models/x}'`
    models: dict[str, str] | None = None


class SlurmJob(Section):
    """One stage's Slurm job (profiles/slurm). None: the top-level value, or the cluster's
    default. GPUs and nodes of the train job are not here: they come from launcher."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus: int | None = Field(default=None, ge=1)  # per task (train: per node)
    mem_mb: int | None = Field(default=None, ge=1)  # per node
    runtime: int | None = Field(default=None, ge=1)  # minutes


class Slurm(Section):
    partition: str | None = None  # for every stage unless its job says otherwise
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # train asks for SIGTERM this long before its time limit: it checkpoints, exits, and the
    # profile's retry resumes it (Slurm sends SIGTERM at the limit too, but only KillWait before SIGKILL)
    stop_signal_s: int = Field(default=300, ge=1)
    # a retried job asks for runtime x runtime_growth^(attempt-1): more time after a time limit
    runtime_growth: float = Field(default=1.0, ge=1.0)
    jobs: dict[Literal[stages.SLURM_JOBS], SlurmJob] = {}  # type: ignore[valid-type]  # (a tuple: the same as listing them)


class Config(Section):
    conf_digest: str | None = None  # which conf/ this tree was composed from (see conf_digest())
    data: Data
    model: Model
    tokenizer: Tokenizer
    template: Template
    pack: Pack
    train: Train
    peft: Peft
    launcher: Launcher
    tracking: Tracking
    consolidate: Consolidate
    eval: Eval
    slurm: Slurm = Slurm()  # read by the rules' resources only: no stage reruns when it changes

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.model.source == "scratch" and self.tokenizer.source == "model":
            raise ValueError("model.source=scratch has no tokenizer of its own: use tokenizer=train")
        if self.template.name == "model" and self.tokenizer.source == "train":
            raise ValueError("a trained tokenizer has no chat template of its own: use template=chatml")
        kinds = TRAINER_KIND[self.train.method]
        if self.data.kind not in kinds:
            raise ValueError(
                f"train.method={self.train.method} trains on {' or '.join(kinds)} data but data.kind is "
                f"{self.data.kind} (train={self.train.method} selects its demo data; pick data= to match)"
            )
        return self


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


def _validated(model: type[BaseModel], tree: dict[str, Any], what: str):
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            what_is_wrong = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            if e["type"] == "missing":
                what_is_wrong = "missing required value"
            path = _dotted(e["loc"]) or "<root>"
            # a section's own check (kind vs trainer, ...) gets the whole section as its input: the
            # reason names the keys, a dump of the section would bury it
            quiet = e["type"] in ("extra_forbidden", "missing") or isinstance(e["input"], (dict, list))
            got = "" if quiet else f" (got {e['input']!r})"
            lines.append(f"  {path}: {what_is_wrong}{got}")
        raise ConfigError(f"{what}:\n" + "\n".join(lines)) from None
