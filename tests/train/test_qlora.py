"""QLoRA for real, on CPU: bitsandbytes (0.48 and later) has CPU 4-bit kernels, so the path a GPU
run takes (a 4-bit NF4 base, TRL's bf16 adapters, consolidate quantizing the base again to check
the adapter, then merging it into the full-precision base) runs here end to end; only its speed
needs a GPU (benchmarks/gpu/bench.py's qlora section)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftflow import paths, runner
from ftflow.config.params import compose, stage_params
from ftflow.consolidate import ConsolidateError
from ftflow.train import curve

from helpers import clone, prepared

OVERRIDES = ["peft=qlora", "+data.sources.0.limit=200", "pack.max_length=128", "train.max_steps=20",
             "train.logging_steps=1", "tracking=none"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = prepared(tmp_path_factory.mktemp("qlora") / "repo", OVERRIDES)
    tree = compose(OVERRIDES, root / "conf")
    runner.run("train", stage_params(tree, "train"), root)
    return root, tree


@pytest.mark.slow
def test_qlora_trains_bf16_adapters_and_the_loss_falls(trained):
    root, tree = trained
    out = root / paths.TRAIN
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == tree["peft"]["r"]
    adapter = load_file(out / "model" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}  # TRL trains QLoRA adapters in bf16
    losses = [v for _, v in curve.series(curve.read(out / "loss.csv"), "train", "loss")]
    assert len(losses) == 20 and sum(losses[-5:]) < 0.95 * sum(losses[:5]), losses


@pytest.mark.slow
def test_consolidate_checks_the_adapter_over_the_4bit_base_and_merges_it_into_full_precision(trained):
    """The verification reproduces train's logits with the adapter over the base quantized again
    (far closer than over the full-precision base: train did run over 4-bit weights), the merge
    equals the adapter over the full-precision base, and the output is a plain float model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftflow.train.probe import logprobs, read_probe

    root, tree = trained
    summary = runner.run("consolidate", stage_params(tree, "consolidate"), root)
    check = summary["verification"]
    trained_weights = check["checks"]["trained_weights"]
    assert summary["merged_lora"] and check["ok"], check
    assert "quantized to 4 bits" in trained_weights["compares"] and trained_weights["ok"]
    # the 4-bit model gives train's logits; the same adapter over unquantized weights does not
    assert trained_weights["max_abs_logprob_diff"] * 5 < check["precision"]["dequantization"], check
    assert check["checks"]["merge"]["ok"] and check["checks"]["merge"]["max_abs_logprob_diff"] < 1e-3

    out = root / paths.CONSOLIDATE / "model"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert not any("lora" in k for k in f.keys())
    assert dtypes == {"F32"}, dtypes  # consolidate.dtype: float32 on CPU (no uint8 4-bit blocks)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    over_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / paths.TRAIN / "init"),
                                          root / paths.TRAIN / "model").eval()  # fmt: skip
    probe = read_probe(root / paths.TRAIN)
    torch.testing.assert_close(logprobs(merged, probe), logprobs(over_full, probe), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_an_adapter_that_is_not_the_trained_one_fails_the_qlora_verification(trained, tmp_path):
    """lora_B zeroed: the adapter no longer adds what train learned; the check over the 4-bit base
    catches it and nothing is written."""
    root, tree = trained
    root = clone(root, tmp_path / "repo")
    shutil.rmtree(root / paths.CONSOLIDATE, ignore_errors=True)  # (the test above consolidated)
    path = root / paths.TRAIN / "model" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in load_file(path).items()}, str(path))
    with pytest.raises(ConsolidateError, match=r"verification failed: the trained weights in results/train/model"):
        runner.run("consolidate", stage_params(tree, "consolidate"), root)
    assert not (root / paths.CONSOLIDATE / "model").exists()
    record = json.loads((root / paths.CONSOLIDATE / "verification.json").read_text())
    assert not record["checks"]["trained_weights"]["ok"]
