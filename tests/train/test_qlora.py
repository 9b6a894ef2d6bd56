"""QLoRA for real, on CPU: bitsandbytes (0.50 and later) has CPU 4-bit kernels, so the path a GPU
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

from helpers import clone, ftflow, prepared

# a validation pass halfway: training goes on after a forward without gradients
OVERRIDES = ["peft=qlora", "+data.sources.0.limit=200", "pack.max_length=128", "train.max_steps=20",
             "train.eval_steps=10", "train.logging_steps=1", "tracking=none"]  # fmt: skip


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
    rows = curve.read(out / "loss.csv")
    losses = [v for _, v in curve.series(rows, "train", "loss")]
    assert len(losses) == 20 and sum(losses[-5:]) < 0.95 * sum(losses[:5]), losses
    assert [s for s, _ in curve.series(rows, "validation", "loss")] == [10, 20]


@pytest.mark.slow
def test_a_4bit_layer_still_backpropagates_after_a_forward_without_gradients(trained):
    """bitsandbytes' AVX512-BF16 CPU path repacks a 4-bit layer's weights at its first forward
    without gradients (a validation pass) for an inference kernel with no backward; the layers
    train loads keep the path that backpropagates, whatever the CPU (and an MLP width that is
    not a multiple of 32, which the repacking refuses)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftflow.config.schema import stage_config
    from ftflow.train.worker import load_model

    root, tree = trained
    cfg = stage_config("train", stage_params(tree, "train"))
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "odd-widths")
    model = load_model(cfg.model, cfg.peft, root / "odd-widths", 64, "float32", cpu=True)
    ids = torch.randint(0, 64, (1, 16))

    def input_gradient():
        hidden = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model.model.layers[0].mlp(hidden).sum().backward()
        return hidden.grad

    model.train()
    before = input_gradient()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the validation pass
    model.train()
    after = input_gradient()
    assert before is not None and after is not None and torch.allclose(after, before), (before, after)


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
    # the 4-bit model gives train's logits (the same CPU kernels: the same numbers); the same
    # adapter over unquantized weights does not
    assert trained_weights["max_abs_logprob_diff"] < 1e-4 < 0.01 < check["precision"]["dequantization"], check
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


@pytest.mark.slow
def test_qlora_under_zero3_on_two_processes_trains_and_consolidates(trained, tmp_path):
    """Each process loads its 4-bit copy (gloo, 2 processes); the adapter comes back whole and
    consolidate reproduces train's logits over the base quantized again."""
    root, _ = trained
    root = clone(root, tmp_path / "repo")
    shutil.rmtree(root / paths.TRAIN)
    shutil.rmtree(root / paths.CONSOLIDATE, ignore_errors=True)
    zero3 = [*OVERRIDES, "launcher=zero3", "train.max_steps=6", "train.save_steps=3", "train.eval_steps=0"]
    ftflow("train", *zero3, cwd=root)
    assert sorted(p.name for p in (root / paths.WORKERS).iterdir()) == ["0.json", "0.pid", "1.json", "1.pid"]
    losses = [v for _, v in curve.series(curve.read(root / paths.TRAIN / "loss.csv"), "train", "loss")]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    ftflow("consolidate", *zero3, cwd=root)
    check = json.loads((root / paths.CONSOLIDATE / "verification.json").read_text())
    assert check["ok"] and check["checks"]["trained_weights"]["max_abs_logprob_diff"] < 1e-4, check
