"""consolidate from full weights and from an FSDP sharded checkpoint (ZeRO-3 shards and LoRA are
in test_train.py and test_train_consolidate.py), each checked against the logits the trained
model recorded; a damaged weight file fails the stage."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftflow import paths
from ftflow.train.launcher import free_port

from helpers import REPO, SMALL_SFT, clone, env, ftflow, prepared


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = prepared(tmp_path_factory.mktemp("full") / "repo", SMALL_SFT)
    # long enough (about 4 epochs of 200 conversations) to learn that an answer ends the turn
    ftflow("train", *SMALL_SFT, "train.max_steps=80", "train.save_steps=100", "train.logging_steps=10", cwd=root)
    return root


def verification(root: Path) -> dict:
    return json.loads((root / paths.CONSOLIDATE / "verification.json").read_text())


def probe_logits(model_dir: Path, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    probe = load_file(root / paths.TRAIN / "probe.safetensors")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        got = model(input_ids=probe["input_ids"][None]).logits[0, -probe["logits"].shape[0] :]
    return got, probe["logits"]


@pytest.mark.slow
def test_full_weights_consolidate_into_a_verified_model(trained, tmp_path):
    root = clone(trained, tmp_path / "repo")
    ftflow("consolidate", *SMALL_SFT, cwd=root)
    check = verification(root)
    assert check["ok"] and check["max_abs_logprob_diff"] < 1e-5 and check["tolerance"] == 1e-3, check
    assert check["precision"] == {"training": "float32", "output": "float32", "training_rounding": 0.0,
                                  "output_rounding": 0.0, "written_vs_recorded": check["max_abs_logprob_diff"]}  # fmt: skip
    got, want = probe_logits(root / paths.CONSOLIDATE / "model", root)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_damaged_weight_file_fails_the_stage(trained, tmp_path):
    root = clone(trained, tmp_path / "repo")
    weights = root / paths.TRAIN / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    # a run of large floats in the middle of the tensor data, as a bad disk or copy would leave
    middle = header + (len(data) - header) // 2
    data[middle : middle + 4096] = struct.pack("<f", 1e4) * 1024
    weights.write_bytes(bytes(data))
    proc = ftflow("consolidate", *SMALL_SFT, cwd=root, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (
        "verification failed: the trained weights in results/train/model, run at the precision training ran "
        "in (float32), give log-probabilities on the probe that differ from those train recorded" in proc.stderr
    )
    assert "Not a precision difference: both sides are float32. A training output is damaged" in proc.stderr
    check = verification(root)
    assert (
        check["ok"] is False
        and check["checks"]["trained_weights"]["ok"] is False
        and check["check"] == "trained_weights"
    )
    assert not (root / paths.CONSOLIDATE / "model").exists()  # nothing written that looks usable


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_consolidates(trained, tmp_path):
    """accelerate runs FSDP on GPUs only: a 2-process gloo job with torch's own FSDP2 writes the
    sharded checkpoint (torch.distributed.checkpoint) that FSDP training leaves."""
    root = clone(trained, tmp_path / "repo")
    shutil.rmtree(root / paths.TRAIN / "model")
    (root / paths.TRAIN / "probe.safetensors").unlink()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()),
                           str(REPO / "tests" / "helpers" / "fsdp_checkpoint.py"), str(root)],
                          cwd=root, env=env(), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FSDP: " in proc.stdout and " 0 of " not in proc.stdout, proc.stdout  # really sharded
    shards = sorted(p.name for p in (root / paths.TRAIN / "model" / "pytorch_model_fsdp_0").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    ftflow("consolidate", *SMALL_SFT, cwd=root)
    check = verification(root)
    assert check["ok"] and check["max_abs_logprob_diff"] < 1e-4, check
    got, want = probe_logits(root / paths.CONSOLIDATE / "model", root)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    init = load_file(root / paths.TRAIN / "init" / "model.safetensors")
    tuned = load_file(next((root / paths.CONSOLIDATE / "model").glob("*.safetensors")))
    assert any(not torch.equal(init[k], tuned[k]) for k in init)  # the FSDP steps' weights, not the init


@pytest.mark.slow
def test_consolidated_model_stops_at_the_end_of_turn(trained, tmp_path):
    """generate() with the saved generation config stops at the template's <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = clone(trained, tmp_path / "repo")
    ftflow("consolidate", *SMALL_SFT, cwd=root)
    out = root / paths.CONSOLIDATE / "model"
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == eot != tok.eos_token_id or eot == tok.eos_token_id
    stopped = 0
    for words in ("red cat sea", "owl fig snow pink", "sun bee kiwi"):
        ids = tok.apply_chat_template([{"role": "user", "content": f"What is the last word?\n{words}"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
        new = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
        stopped += new[-1] == eot and len(new) < 24
    assert stopped == 3


@pytest.mark.slow
def test_evaluate_scores_base_and_tuned_on_both_task_kinds(trained, tmp_path):
    root = clone(trained, tmp_path / "repo")
    ftflow("consolidate", *SMALL_SFT, cwd=root)
    ftflow("evaluate", *SMALL_SFT, "eval.limit=40", cwd=root)
    metrics = json.loads((root / paths.EVALUATE / "metrics.json").read_text())
    for label in ("base", "tuned"):
        assert f"{label}/demo_words/exact_match" in metrics  # generative
        assert f"{label}/demo_words_choice/acc" in metrics  # multiple choice by log-likelihood
    # (80 steps on 200 records learn the format, not the task: the demo pipeline's full run does)
    assert all(0 <= v <= 1 for k, v in metrics.items() if not k.startswith("delta/")), metrics
    samples = [json.loads(line) for line in (root / paths.EVALUATE / "tuned" / "samples.jsonl").open()]
    assert {s["task"] for s in samples} == {"demo_words", "demo_words_choice"} and len(samples) == 80


@pytest.mark.slow
def test_evaluate_any_model_directory(trained, tmp_path):
    """The same stage on model directories of one's choice (each with its tokenizer)."""
    root = clone(trained, tmp_path / "repo")
    ftflow("consolidate", *SMALL_SFT, cwd=root)
    mine = str(root / paths.CONSOLIDATE / "model")
    ftflow(
        "evaluate",
        *SMALL_SFT,
        "eval.limit=8",
        "eval.tasks=[demo_words_choice]",
        f"eval.models={{mine: '{mine}'}}",
        cwd=root,
    )
    metrics = json.loads((root / paths.EVALUATE / "metrics.json").read_text())
    assert set(metrics) == {"mine/demo_words_choice/acc", "mine/demo_words_choice/acc_norm"}
    table = (root / paths.EVALUATE / "comparison.md").read_text()
    assert table.splitlines()[0] == "| task / metric | mine |" and "| demo_words_choice/acc | " in table
    proc = ftflow("evaluate", *SMALL_SFT, "eval.models={x: /nonexistent}", cwd=root, check=False)
    assert proc.returncode == 1 and "eval.models.x: /nonexistent is not a Hugging Face model directory" in proc.stderr


@pytest.mark.slow
def test_16bit_output_is_verified_in_float32_and_its_rounding_reported(trained, tmp_path):
    """consolidate.dtype=bfloat16: the check runs where precision cannot blur it (the trained
    weights against train's float32 record); what rounding to bf16 then does is reported."""
    root = clone(trained, tmp_path / "repo")
    ftflow("consolidate", *SMALL_SFT, "consolidate.dtype=bfloat16", cwd=root)
    check = verification(root)
    assert check["ok"] and check["max_abs_logprob_diff"] < 1e-5, check
    prec = check["precision"]
    assert (prec["training"], prec["output"]) == ("float32", "bfloat16") and 0 < prec["output_rounding"] < 1, prec
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(root / paths.CONSOLIDATE / "model").dtype == torch.bfloat16


@pytest.mark.slow
def test_a_pretrained_base_keeps_its_generation_config(tmp_path, smollm2_dir):
    """A real model's generation config is kept whole (sampling defaults, several eos ids), the
    template's end of turn added to its eos ids when missing; a scratch model gets eos and pad."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    from ftflow.consolidate import set_generation_eos

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = tmp_path / "base"
    base.mkdir()
    GenerationConfig(bos_token_id=1, eos_token_id=[0, 7], pad_token_id=None, do_sample=True, temperature=0.2,
                     top_p=0.9, repetition_penalty=1.1).save_pretrained(base)  # fmt: skip
    model = SimpleNamespace(config=SimpleNamespace(), generation_config=None)
    assert set_generation_eos(model, tok, "<|im_end|>", base) == 2
    gen = model.generation_config
    assert gen.eos_token_id == [0, 7, 2] and gen.pad_token_id == tok.pad_token_id == 2
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.repetition_penalty, gen.bos_token_id) == (
        True,
        0.2,
        0.9,
        1.1,
        1,
    )
    set_generation_eos(model, tok, None, smollm2_dir)  # eos already there (the tokenizer's): unchanged
    assert model.generation_config.to_diff_dict() == GenerationConfig.from_pretrained(smollm2_dir).to_diff_dict()
    scratch = SimpleNamespace(config=SimpleNamespace(), generation_config=None)
    set_generation_eos(scratch, tok, "<|im_end|>")
    assert (scratch.generation_config.eos_token_id, scratch.config.eos_token_id) == (2, 2)
    assert not scratch.generation_config.do_sample  # nothing but eos and pad
