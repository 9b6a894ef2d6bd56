"""pack: template, assistant-only labels, packing stats, and packed attention that stays inside
each conversation (the packed forward pass equals the separate forward passes)."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from ftflow import paths
from ftflow.config import compose, stage_params
from ftflow.normalize import normalize
from ftflow.pack import IGNORE_INDEX, pack

from conftest import REPO


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    shutil.copytree(REPO / "examples", root / "examples")
    tree = compose(["+data.sources.0.limit=300", "pack.max_length=128"], REPO / "conf")
    for s in tree["data"]["sources"]:
        (root / paths.RAW / s["name"]).mkdir(parents=True)
        shutil.copy(root / s["path"], root / paths.RAW / s["name"])
    normalize(stage_params(tree, "normalize"), root)
    stats = pack(stage_params(tree, "pack"), root)
    return root, stats


def test_labels_cover_exactly_the_assistant_turns(packed):
    root, _ = packed
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    ds = datasets.load_from_disk(str(root / paths.PACK / "train"))
    row = ds[0]
    # split the packed row back into its conversations
    starts = [0]
    for n in row["seq_lengths"]:
        starts.append(starts[-1] + n)
    raw = [json.loads(line) for line in (root / "examples/demo/train.jsonl").read_text().splitlines()]
    outputs = {r["output"] for r in raw}
    for a, b in zip(starts, starts[1:]):
        ids, labels = row["input_ids"][a:b], row["labels"][a:b]
        trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained.endswith("<|im_end|>")
        assert trained.removesuffix("<|im_end|>") in outputs  # the answer, nothing of the prompt
        assert tok.decode(ids).startswith("<|im_start|>user\n")


def test_stats_and_packing_efficiency(packed):
    root, stats = packed
    train = stats["splits"]["train"]
    ds = datasets.load_from_disk(str(root / paths.PACK / "train"))
    assert train["conversations"] == 300 and train["sequences"] == len(ds)
    assert sum(sum(r) for r in ds["seq_lengths"]) == train["tokens"]
    assert all(len(r) <= 128 for r in ds["input_ids"])
    assert train["packing_efficiency"] == round(train["tokens"] / (len(ds) * 128), 4) > 0.85
    assert json.loads((root / paths.PACK / "stats.json").read_text()) == stats


def test_chat_template_generation_prompt(packed):
    root, _ = packed
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_packed_forward_equals_separate_forwards(packed):
    """No cross-contamination: with TRL's padding-free collator, each packed conversation gets
    the same logits as when it is run alone."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    root, _ = packed
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    row = datasets.load_from_disk(str(root / paths.PACK / "train"))[0]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)([row])
    with torch.no_grad():
        # use_cache=False as SFTTrainer passes it: transformers derives the block-diagonal mask
        # from position_ids only when no KV cache is in play
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        # control: without per-sequence position ids, later conversations do see earlier ones
        naive_logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        n0 = row["seq_lengths"][0]
        assert not torch.allclose(naive_logits[n0:], packed_logits[n0:], atol=1e-3)
        start = 0
        for n in row["seq_lengths"]:
            alone = model(input_ids=torch.tensor([row["input_ids"][start : start + n]])).logits[0]
            torch.testing.assert_close(packed_logits[start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
    assert len(row["seq_lengths"]) > 1  # the test means something only if the row holds several


def test_overflow_truncates_and_counts(tmp_path):
    from ftflow.config import Pack
    from ftflow.pack import chatml_template, tokenize, train_tokenizer, render, Tokenizer

    convs = [[{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}],
             [{"role": "user", "content": "short"}, {"role": "assistant", "content": "fine " * 3}]]  # fmt: skip
    tok = train_tokenizer(render(convs, chatml_template()), Tokenizer(source="train", vocab_size=300), "<|im_end|>")
    tok.chat_template = chatml_template()
    ds, counts = tokenize(convs, tok, Pack(max_length=20, overflow="truncate"))
    # the long one loses its answer to truncation: nothing to learn, so it is dropped and counted
    assert counts == {"truncated": 1, "dropped": 1} and len(ds) == 1
    ds, counts = tokenize(convs, tok, Pack(max_length=20, overflow="drop"))
    assert counts == {"truncated": 0, "dropped": 1}
