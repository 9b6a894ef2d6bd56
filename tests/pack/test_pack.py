"""pack: template, assistant-only labels, packing stats, and packed attention that stays inside
each conversation (the packed forward pass equals the separate forward passes)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from ftflow import paths, runner
from ftflow.config.params import compose, stage_params
from ftflow.config.schema import Pack, Tokenizer
from ftflow.disk import OutOfSpace
from ftflow.integrity import DamagedInput
from ftflow.pack.encode import IGNORE_INDEX, Encoded, encode
from ftflow.pack.inspect import inspect as inspect_rows
from ftflow.pack.io import template_message
from ftflow.pack.packing import Sequences, best_fit_decreasing, fit
from ftflow.pack.templates import TEMPLATES, template_text
from ftflow.pack.tokenizer import render, train_tokenizer

from helpers import REPO, ftflow, small_file_system


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    shutil.copytree(REPO / "examples", root / "examples")
    tree = compose(["+data.sources.0.limit=300", "pack.max_length=128"], REPO / "conf")
    for s in tree["data"]["sources"]:
        (root / paths.RAW / s["name"]).mkdir(parents=True)
        shutil.copy(root / s["path"], root / paths.RAW / s["name"])
    runner.run("normalize", stage_params(tree, "normalize"), root)
    stats = runner.run("pack", stage_params(tree, "pack"), root)
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
    assert train["conversations"] == train["sequences"] == 300 and train["rows"] == len(ds)
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
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[
            0
        ]
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


def overflow_case(policy: str) -> tuple[Encoded, Sequences, dict]:
    """Three conversations of 50, 12 and 30 tokens; the first trains only on its last 5 tokens."""
    lengths = np.array([50, 12, 30])
    ids = np.arange(int(lengths.sum()), dtype=np.int32)
    labels = ids.copy()
    labels[:45] = IGNORE_INDEX  # the long one's target sits at its very end
    enc = Encoded(ids, labels, lengths)
    counts: dict = {}
    return enc, fit(enc, Pack(max_length=20, overflow=policy), counts), counts


def test_overflow_policies_are_counted():
    _, seqs, counts = overflow_case("truncate")  # the long one loses its target: nothing left to learn
    assert seqs.lengths.tolist() == [12, 20]
    # 30 + 10 tokens cut off; of them trained: the first one's 5, the last one's 10
    assert counts == {"over_max_length": 2, "dropped_no_target": 1, "tokens_lost_to_overflow": 40,
                      "trained_tokens_lost_to_overflow": 15}  # fmt: skip
    _, seqs, counts = overflow_case("drop")
    assert seqs.lengths.tolist() == [12] and counts == {"over_max_length": 2, "dropped_too_long": 2, "dropped_no_target": 0,
                                                        "tokens_lost_to_overflow": 80, "trained_tokens_lost_to_overflow": 35}  # fmt: skip
    enc, seqs, counts = overflow_case("split")  # 50 -> 20 + 20 + 10 (only the last has a target); 30 -> 20 + 10
    assert seqs.lengths.tolist() == [10, 12, 20, 10] and seqs.starts.tolist() == [40, 50, 62, 82]
    assert counts == {"over_max_length": 2, "dropped_no_target": 2}


def test_best_fit_decreasing_fills_rows():
    lengths = np.array([9, 2, 7, 3, 1, 8, 5])
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))  # every sequence, once
    assert all(lengths[b].sum() <= 10 for b in bins) and len(bins) == 4  # 35 tokens: 4 rows is optimal
    assert bins == best_fit_decreasing(lengths, 10)  # deterministic


# --- exactness against transformers, on the real sample formats ------------------------------

TEMPLATE_TOKENS = {"chatml": ("<|im_end|>", None), "llama3": ("<|eot_id|>", "<|begin_of_text|>")}


def fixture_conversations(tmp_path) -> list[tuple[list[dict], list | None]]:
    """Every conversation in the fixture files, normalized (alpaca with a system prompt; the
    preference and KTO samples as prompt + chosen / completion)."""
    sources = [
        ("alpaca", "alpaca_en_demo.json", "alpaca", "conversation", {"system": "You are a helpful assistant."}),
        ("glaive", "glaive_toolcall_en_demo.json", "sharegpt", "conversation", {}),
        ("dpo", "dpo_en_demo.json", "sharegpt_preference", "preference", {}),
        ("kto", "kto_en_demo.json", "unpaired_preference", "unpaired", {}),
    ]
    out = []
    for name, file, reader, kind, opts in sources:
        root = tmp_path / name
        (root / paths.RAW / name).mkdir(parents=True)
        shutil.copy(REPO / "examples/formats" / file, root / paths.RAW / name)
        runner.run(
            "normalize",
            {"data": {"kind": kind, "sources": [{"name": name, "path": "x", "reader": reader, **opts}]}},
            root,
        )
        for row in pq.read_table(root / paths.NORMALIZE / "train.parquet").to_pylist():
            msgs = row.get("messages") or row["prompt"] + (row.get("chosen") or row["completion"])
            out.append(([template_message(m) for m in msgs], json.loads(row["tools"]) if row.get("tools") else None))
    return out


@pytest.fixture(scope="module")
def fixture_convs(tmp_path_factory):
    return fixture_conversations(tmp_path_factory.mktemp("fixtures"))


def fixture_tokenizer(convs, name: str):
    eos, bos = TEMPLATE_TOKENS[name]
    tpl = template_text(name)
    texts = render([c for c, _ in convs], tpl, [t for _, t in convs], bos_token=bos or "")
    tok = train_tokenizer(texts, Tokenizer(source="train", vocab_size=2000), eos, TEMPLATES[name].markers)
    tok.chat_template = tpl
    if bos:
        tok.bos_token = bos
    return tok


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_tokens_and_masks_equal_apply_chat_template(fixture_convs, name):
    tok = fixture_tokenizer(fixture_convs, name)
    convs, tools = [c for c, _ in fixture_convs], [t for _, t in fixture_convs]
    assert len(convs) == 999 + 300 + 300 + 300 and sum(t is not None for t in tools) == 300
    enc = encode(convs, tools, tok)
    start = 0
    for conv, tool, n in zip(convs, tools, enc.lengths.tolist()):
        ref = tok.apply_chat_template(
            conv, tools=tool, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert enc.ids[start : start + n].tolist() == ref["input_ids"]
        trained = (enc.labels[start : start + n] != IGNORE_INDEX).astype(int).tolist()
        assert trained == ref["assistant_masks"] and any(trained)
        start += n


def spans_of(labels: np.ndarray) -> list[tuple[int, int]]:
    """Runs of trained positions, as (start, end)."""
    trained = np.concatenate([[False], labels != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(trained[1:] != trained[:-1])
    return list(zip(edges[::2], edges[1::2]))


def test_trained_spans_decode_to_the_assistant_turns(fixture_convs):
    """Multi-turn tool-call conversations (glaive): each trained span decodes to one assistant
    turn of the normalized record, end-of-turn token included, and nothing else is trained."""
    tok = fixture_tokenizer(fixture_convs, "chatml")
    glaive = fixture_convs[999:1299]
    enc = encode([c for c, _ in glaive], [t for _, t in glaive], tok)
    start, calls, multi_turn = 0, 0, 0
    for (conv, _), n in zip(glaive, enc.lengths.tolist()):
        labels, ids = enc.labels[start : start + n], enc.ids[start : start + n]
        decoded = [tok.decode(ids[a:b], clean_up_tokenization_spaces=False) for a, b in spans_of(labels)]
        turns = [m for m in conv if m["role"] == "assistant"]
        assert len(decoded) == len(turns)
        multi_turn += len(turns) > 1
        for text, turn in zip(decoded, turns):
            assert text.endswith("<|im_end|>")
            body = text.removesuffix("<|im_end|>")
            if turn.get("tool_calls"):
                call = json.loads(body.split("<tool_call>\n", 1)[1].split("\n</tool_call>")[0])
                fn = turn["tool_calls"][0]["function"]
                assert (call["name"], call["arguments"]) == (fn["name"], fn["arguments"])
                calls += 1
            else:
                assert body == turn["content"]
        start += n
    assert calls > 100 and multi_turn > 200


def test_inspect_marks_trained_and_masked_tokens(packed):
    """`ftflow inspect` (stdout not a terminal): the stats line, then each sequence with the
    assistant answer and its end-of-turn token inside «...» and the prompt outside."""
    root, stats = packed
    out = ftflow("inspect", str(root / paths.PACK / "train"), "--rows", "1", cwd=root).stdout
    train = stats["splits"]["train"]
    assert out.startswith(f"train: {train['conversations']:,} conversations -> {train['sequences']:,} sequences")
    assert f"packing efficiency {train['packing_efficiency']:.2%}" in out
    sequences = out.split("--- sequence ")[1:]
    assert len(sequences) == len(datasets.load_from_disk(str(root / paths.PACK / "train"))[0]["seq_lengths"])
    for seq in sequences:
        body = seq.split("---\n", 1)[1]
        assert body.startswith("<|im_start|>user\n") and "\x1b[" not in body  # no colour codes in a pipe
        assert body.rstrip("\n").endswith("<|im_start|>assistant\n«" + body.split("«")[1].split("»")[0] + "»")
        assert body.split("«")[1].split("»")[0].endswith("<|im_end|>")


# --- the other data kinds --------------------------------------------------------------------


def pack_kind(tmp_path, file: str, reader: str, kind: str, folder: str = "examples/formats") -> tuple[Path, dict]:
    """Normalize a fixture file as `kind`, then pack it with a tokenizer trained on it."""
    (tmp_path / paths.RAW / "f").mkdir(parents=True)
    shutil.copy(REPO / folder / file, tmp_path / paths.RAW / "f")
    runner.run(
        "normalize", {"data": {"kind": kind, "sources": [{"name": "f", "path": "x", "reader": reader}]}}, tmp_path
    )
    cfg = {"model": {"name": "m", "source": "scratch", "architecture": {}}, "tokenizer": {"source": "train", "vocab_size": 1000},
           "template": {"name": "chatml"}, "pack": {"max_length": 1024, "num_proc": 2}}  # fmt: skip
    return tmp_path, runner.run("pack", cfg, tmp_path)


def test_preference_pairs_are_tokenized_as_trl_splits_them(tmp_path):
    root, stats = pack_kind(tmp_path, "dpo_en_demo.json", "sharegpt_preference", "preference")
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    ds = datasets.load_from_disk(str(root / paths.PACK / "train"))
    rows = pq.read_table(root / paths.NORMALIZE / "train.parquet").to_pylist()
    assert set(ds.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    assert stats["splits"]["train"]["records"] == 300 == len(ds) + stats["splits"]["train"]["dropped_prompt_too_long"]
    ids = lambda conv, **kw: tok.apply_chat_template(conv, **kw)["input_ids"]  # noqa: E731
    kept = [r for r in rows if len(ids([template_message(m) for m in r["prompt"]], add_generation_prompt=True)) < 1024]
    assert len(kept) == len(ds)
    for row, ex in zip(kept, ds):
        prompt = [template_message(m) for m in row["prompt"]]
        for side in ("chosen", "rejected"):
            whole = ids(prompt + [template_message(m) for m in row[side]])
            assert ex["prompt_ids"] + ex[f"{side}_ids"] == whole  # nothing lost, nothing added
        with_header = ids(prompt, add_generation_prompt=True)
        assert with_header[: len(ex["prompt_ids"])] == ex["prompt_ids"]  # the shared prefix


@pytest.mark.parametrize(
    "file,reader,kind,parts",
    [
        ("examples/formats/dpo_en_demo.json", "sharegpt_preference", "preference", ["chosen", "rejected"]),
        ("examples/formats/kto_en_demo.json", "unpaired_preference", "unpaired", ["completion (label "]),
        ("examples/demo/prompts.jsonl", "prompt_answer", "prompt", ["reference answer"]),
    ],
)
def test_inspect_shows_rows_of_every_data_kind(tmp_path, file, reader, kind, parts):
    """`ftflow inspect` on preference, unpaired and prompt rows: the prompt masked, each
    completion trained (chosen and rejected in turn), the label or the reference answer."""
    root, stats = pack_kind(tmp_path, file, reader, kind, folder="")
    train = stats["splits"]["train"]
    out = inspect_rows(root / paths.PACK / "train", rows=2, color=False)
    assert out.startswith(f"train: {train['records']:,} records -> {train['rows']:,} rows; {train['tokens']:,} tokens")
    first = datasets.load_from_disk(str(root / paths.PACK / "train"))[0]
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    row = out.split("=== row 0 ===")[1].split("=== row 1 ===")[0]
    assert f"--- prompt ({len(first['prompt_ids'])} tokens, masked) ---\n" in row and "«" not in row.split("---")[2]
    for part in parts:
        assert f"--- {part}" in row, row
    for column in (c for c in first if c.endswith("_ids") and c != "prompt_ids"):
        text = tok.decode(first[column], clean_up_tokenization_spaces=False)
        assert f"«{text}»" in row  # the completion whole, and trained
    if kind == "prompt":
        assert row.rstrip().endswith(first["answer"])


def test_raw_text_is_packed_with_every_token_trained(tmp_path):
    """Raw text: every token trained, and with the default overflow (auto: split for text) no
    token lost: the texts over max_length go on in the next pieces."""
    root, stats = pack_kind(tmp_path, "c4_demo.jsonl", "text", "text")
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    ds = datasets.load_from_disk(str(root / paths.PACK / "train"))
    train = stats["splits"]["train"]
    assert train["conversations"] == 300 and train["trained_tokens"] == train["tokens"]
    assert train["overflow"] == "split" and train["over_max_length"] > 0 and "tokens_lost_to_overflow" not in train
    texts = [json.loads(line)["text"] for line in (REPO / "examples/formats/c4_demo.jsonl").read_text().splitlines()]
    encoded = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    assert train["tokens"] == sum(len(e.ids) + 1 for e in encoded)  # every text whole, and its eos
    seen = set()
    for row in ds:
        assert row["labels"] == row["input_ids"]
        start = 0
        for n in row["seq_lengths"]:
            seq = row["input_ids"][start : start + n]
            start += n
            if seq[-1] == tok.eos_token_id and n < 1024:  # a text's end (a short text whole, a long one's last piece)
                seen.add(tok.decode(seq[:-1], clean_up_tokenization_spaces=False))
    assert all(any(t.endswith(end) for t in texts) for end in seen) and len(seen) == 300


def test_shards_bound_memory_and_join_into_one_dataset(tmp_path, monkeypatch):
    """With shards of ~2,000 tokens, the 300 demo conversations are packed shard by shard and
    joined: every sequence is there once, rows stay within max_length, stats add up."""
    import ftflow.pack.packing as pack_module

    monkeypatch.setattr(pack_module, "SHARD_TOKENS", 2000)
    root = tmp_path
    tree = demo_split(root, "+data.sources.0.limit=300", "pack.max_length=128")
    train = runner.run("pack", stage_params(tree, "pack"), root)["splits"]["train"]
    ds = datasets.load_from_disk(str(root / paths.PACK / "train"))
    assert train["tokens"] > 3 * 2000  # several shards
    assert train["conversations"] == train["sequences"] == sum(len(r) for r in ds["seq_lengths"]) == 300
    assert sum(map(len, ds["input_ids"])) == train["tokens"] and max(map(len, ds["input_ids"])) <= 128
    assert len(ds) == train["rows"] and not (root / paths.PACK / "train.shards").exists()


def test_a_full_disk_stops_pack_saying_what_it_needs_and_leaves_no_partial_split(tmp_path, monkeypatch):
    """results/pack on a 200 KB file system (a tmpfs the test mounts, as root): the tokenizer
    fits, the train split's shards do not. pack fails naming the split, the place, about how
    much it needs and what was free; no shard and no part of the split is left. With room,
    the rerun writes what a run on a large disk writes, byte for byte."""
    import ftflow.pack.packing as pack_module

    monkeypatch.setattr(pack_module, "SHARD_TOKENS", 20_000)  # several shards: the disk fills midway
    tree = demo_split(tmp_path / "full", "pack.max_length=128")
    straight = tmp_path / "straight"
    runner.run("pack", stage_params(demo_split(straight, "pack.max_length=128"), "pack"), straight)
    out = tmp_path / "full" / paths.PACK
    with small_file_system(out, 200_000) as resize:
        with pytest.raises(OutOfSpace) as err:
            runner.run("pack", stage_params(tree, "pack"), tmp_path / "full")
        found = re.fullmatch(r"pack train: the file system holding (\S+) is full: it needs about ([\d.,]+) MB and "
                             r"had ([\d.,]+) MB free when the write stopped, ([\d.,]+) MB in; the partial files are "
                             r"removed\. Free space there, or put results/ on a larger file system", str(err.value))  # fmt: skip
        assert found and found[1] == str(out / "train"), err.value
        assert float(found[3]) < 0.1 and not (out / "train").exists() and not (out / "train.shards").exists()
        resize(50_000_000)
        runner.run("pack", stage_params(tree, "pack"), tmp_path / "full")
        real = sum(p.stat().st_size for p in (out / "train").iterdir())
        assert 0.5 * real < float(found[2]) * 1e6 < 2 * real, (real, found[2])  # the estimate
        arrow = sorted((out / "train").glob("*.arrow"))
        assert arrow and [p.read_bytes() for p in arrow] == [
            p.read_bytes() for p in sorted((straight / paths.PACK / "train").glob("*.arrow"))
        ]


def test_pack_refuses_a_normalized_file_that_is_not_what_normalize_wrote(tmp_path):
    """normalize's train.parquet cut short after it was written (a copy that stopped, a damaged
    disk): pack names it and says how to write it again, before it tokenizes anything."""
    tree = demo_split(tmp_path, "+data.sources.0.limit=50")
    parquet = tmp_path / paths.NORMALIZE / "train.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-100])
    with pytest.raises(DamagedInput, match=rf"^{re.escape(str(parquet))} is not the file normalize wrote \(its sha256 "
                       r"differs\): damaged on disk or changed since\. Run normalize again \(`ftflow normalize`\)\.$"):  # fmt: skip
        runner.run("pack", stage_params(tree, "pack"), tmp_path)
    assert not (tmp_path / paths.PACK / "tokenizer").exists()


def demo_split(root: Path, *overrides: str) -> dict:
    """The demo data normalized in `root`; returns the composed config (with `overrides`)."""
    shutil.copytree(REPO / "examples", root / "examples")
    tree = compose(list(overrides), REPO / "conf")
    for s in tree["data"]["sources"]:
        (root / paths.RAW / s["name"]).mkdir(parents=True)
        shutil.copy(root / s["path"], root / paths.RAW / s["name"])
    runner.run("normalize", stage_params(tree, "normalize"), root)
    return tree


def test_pack_is_deterministic_across_worker_counts(tmp_path):
    """3,000 conversations (three work units): 2 worker processes and 1 write the same rows,
    Arrow data files byte for byte."""
    tree = demo_split(tmp_path, "pack.max_length=256", "pack.num_proc=2")
    stats = runner.run("pack", stage_params(tree, "pack"), tmp_path)
    assert stats["splits"]["train"]["conversations"] == 3000
    before = {p.name: p.read_bytes() for p in (tmp_path / paths.PACK / "train").glob("*.arrow")}
    tree["pack"]["num_proc"] = 1
    runner.run("pack", stage_params(tree, "pack"), tmp_path)
    after = {p.name: p.read_bytes() for p in (tmp_path / paths.PACK / "train").glob("*.arrow")}
    assert before and before == after


def test_tool_call_ids_reach_templates_that_match_results_to_calls():
    """OpenAI's tool_call_id says which call a result answers; Gemma 4's template names each
    result after its call by that id (with ids lost, both results were named after the last call)."""
    import trl
    from transformers.utils.chat_template_utils import render_jinja_template

    from ftflow.data.messages import validate
    from ftflow.data.readers import openai_messages

    record = {"messages": [
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "tool_calls": [
            {"id": "a1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}},
            {"id": "b2", "type": "function", "function": {"name": "clock", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "b2", "content": "14:00"},
        {"role": "tool", "tool_call_id": "a1", "content": "-3C"},
        {"role": "assistant", "content": "-3C at 14:00."}]}  # fmt: skip
    conversation = validate(openai_messages(record), "conversation")["messages"]
    template = (Path(trl.__file__).parent / "chat_templates/gemma4.jinja").read_text()
    text = render_jinja_template(conversations=[[template_message(m) for m in conversation]], chat_template=template)[
        0
    ][0]
    assert 'response:clock{value:<|"|>14:00' in text and 'response:weather{value:<|"|>-3C' in text, text


def test_tokenizer_training_sees_long_unbroken_runs_cut():
    """A 5 MB record of one repeated character (found in a real corpus) stalled BPE training for
    minutes: the trainer sees runs cut every 256 characters; ordinary text is untouched."""
    from ftflow.pack.tokenizer import cut_long_runs

    assert cut_long_runs("a" * 600) == "a" * 256 + " " + "a" * 256 + " " + "a" * 88
    text = "An ordinary line, with words of ordinary length.\n" * 20
    assert cut_long_runs(text) == text
    tok = train_tokenizer(
        iter(["hello world"] * 50 + ["x" * 5_000_000]), Tokenizer(source="train", vocab_size=300), "<|im_end|>"
    )
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


def test_a_base_model_never_downloaded_says_to_download_it(tmp_path):
    """pack run by hand before download: the missing base is named with the command that brings
    it, not a traceback from the tokenizer loader."""
    from ftflow.config.schema import Model, Template
    from ftflow.errors import PackError
    from ftflow.pack.tokenizer import build_tokenizer

    model = Model(name="hub_model", source="hub", hub_id="org/hub-model")
    with pytest.raises(PackError, match=r"data/models/hub_model: the base model was never downloaded: run `ftflow "
                                        r"download`, or `ftflow run`, which downloads first"):  # fmt: skip
        build_tokenizer(model, Tokenizer(source="model"), Template(name="model"), tmp_path / "train.parquet", tmp_path)
