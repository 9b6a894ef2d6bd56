"""train (real TRL under accelerate launch) with LoRA, then consolidate merges it into one plain
model directory whose outputs equal the adapter model's."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from ftflow import paths, runner
from ftflow.config.params import compose, stage_params
from ftflow.disk import OutOfSpace
from ftflow.train import curve
from ftflow.train.checkpoints import checkpoint_key

from helpers import prepared, small_file_system

OVERRIDES = ["peft=lora", "+data.sources.0.limit=200", "pack.max_length=128", "train.max_steps=4",
             "train.save_steps=2", "train.logging_steps=1", "train.learning_rate=3e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = prepared(tmp_path_factory.mktemp("train") / "repo", OVERRIDES)
    tree = compose(OVERRIDES, root / "conf")
    runner.run("train", stage_params(tree, "train"), root)
    return root, tree


@pytest.mark.slow
def test_lora_training_writes_adapter_curve_and_checkpoints(trained):
    root, tree = trained
    out = root / paths.TRAIN
    assert (out / "model" / "adapter_config.json").exists()  # an adapter, not full weights
    assert (out / "init" / "model.safetensors").exists()  # the scratch base, for eval and merge
    steps, losses = zip(*curve.series(curve.read(out / "loss.csv"), "train", "loss"))
    assert steps == (1, 2, 3, 4)
    assert all(v > 0 for v in losses) and losses[-1] < 0.9 * losses[0], losses  # the adapters learn
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] is None
    total = sum(t.numel() for t in _tensors(out / "init" / "model.safetensors").values())
    assert 0 < summary["trainable_params"] < total / 2  # only the adapters train
    ckpts = sorted(
        p.name for p in (out / "checkpoints" / checkpoint_key(stage_params(tree, "train"), root)).glob("checkpoint-*")
    )
    assert ckpts == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_rerun_resumes_from_the_last_checkpoint_of_the_same_config(trained):
    root, tree = trained
    before = (root / paths.TRAIN / "model" / "adapter_model.safetensors").read_bytes()
    runner.run("train", stage_params(tree, "train"), root)
    summary = json.loads((root / paths.TRAIN / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-4" and summary["steps"] == 4
    # the last checkpoint was the end: nothing more is trained (no step 5), the same adapter
    ckpt_dir = root / paths.TRAIN / "checkpoints" / checkpoint_key(stage_params(tree, "train"), root)
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (root / paths.TRAIN / "model" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_consolidate_merges_lora_into_a_plain_model(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, tree = trained
    runner.run("consolidate", stage_params(tree, "consolidate"), root)
    out = root / paths.CONSOLIDATE / "model"
    names = set(_tensors(out / "model.safetensors"))
    assert names and not any("lora" in n for n in names)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "{% generation %}" in tok.chat_template
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / paths.TRAIN / "init"), root / paths.TRAIN / "model"
    )
    base = AutoModelForCausalLM.from_pretrained(root / paths.TRAIN / "init")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the last word?\nred cat sea"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    with torch.no_grad():
        want, got, before = adapter(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, before, atol=1e-4)  # training did change the model
    card = (out / "README.md").read_text()
    assert "config fingerprint" in card and "training: sft, lora; 4 steps" in card and "verified: max |log p|" in card
    # the demo model ties its output embedding to the input one: still tied after the merge
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    assert "lm_head.weight" not in names


@pytest.mark.slow
def test_consolidate_on_a_full_disk_removes_its_partial_model_and_says_what_it_needs(trained):
    """results/consolidate on a 1 MB file system (a tmpfs the test mounts, as root), the model
    takes about 3.6: consolidate fails naming the place, the model's size and what was free,
    and leaves no part of the model; with room, the rerun writes it whole."""
    root, tree = trained
    out = root / paths.CONSOLIDATE
    with small_file_system(out, 1_000_000) as resize:
        with pytest.raises(OutOfSpace) as err:
            runner.run("consolidate", stage_params(tree, "consolidate"), root)
        found = re.fullmatch(r"consolidate: the file system holding (\S+) is full: it needs about ([\d.,]+) MB and had "
                             r"([\d.,]+) MB free when the write stopped, ([\d.,]+) MB in; the partial files are removed\. "
                             r"Free space there, or put results/ on a larger file system", str(err.value))  # fmt: skip
        assert found and found[1] == str(out / "model") and float(found[3]) < float(found[2]), err.value
        assert not (out / "model").exists()
        resize(50_000_000)
        runner.run("consolidate", stage_params(tree, "consolidate"), root)
        weights = (out / "model" / "model.safetensors").stat().st_size
        assert abs(float(found[2]) * 1e6 - weights) < 0.01 * weights  # what it said it needed


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
