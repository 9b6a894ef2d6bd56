"""Tokenize + mask + pack, side by side in one process on the same data.

    python benchmarks/pack.py [--conversations 40000] [--max-length 2048] [--vocab 32000]

The alpaca fixture (examples/formats/alpaca_en_demo.json) replicated to N conversations, a
byte-level BPE tokenizer trained here on them and the other fixtures' text (ChatML template),
and three measurements:
  - raw: the fast tokenizer's batch encode of the already rendered text (the floor: no
    template, no masks, no packing),
  - TRL: SFTTrainer's own dataset preparation (chat template, tokenization, assistant-only
    masks, BFD packing), timed around the trainer's construction minus the model's,
  - ftflow: the pack stage on normalize's output (template, tokens, masks, BFD packing, the
    Arrow dataset on disk).
It prints tokens/s of each and the ratios (targets: ftflow >= 0.8x raw, >= 2.5x TRL) and
ftflow's packing efficiency (target >= 99.5%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "examples" / "formats" / "alpaca_en_demo.json"


def write_raw(dest: Path, n: int) -> None:
    base = json.loads(FIXTURE.read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w") as f:
        for i in range(n):
            rec = base[i % len(base)]
            f.write(json.dumps({**rec, "instruction": f"{rec['instruction']} ({i})"}) + "\n")


def vocab_corpus() -> list[str]:
    """Every fixture's text: the alpaca sample alone is too small to fill a 32k vocabulary."""
    out = []
    for path in sorted((REPO / "examples" / "formats").glob("*.json*")):
        if path.suffix not in (".json", ".jsonl"):
            continue
        text = path.read_text()
        records = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
        out += [json.dumps(r, ensure_ascii=False) for r in records]
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def trl_prepare(convs, tok, max_length: int) -> tuple[int, float]:
    """Tokens out of SFTTrainer's dataset preparation, and its time (model creation excluded)."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    ds = datasets.Dataset.from_dict({"messages": convs})
    args = SFTConfig(output_dir=tempfile.mkdtemp(), packing=True, packing_strategy="bfd", max_length=max_length,
                     assistant_only_loss=True, report_to=[], dataset_num_proc=os.cpu_count(), use_cpu=True, bf16=False)  # fmt: skip
    trainer, seconds = timed(lambda: SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok))
    tokens = sum(sum(x) for x in trainer.train_dataset["seq_lengths"])
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=40_000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32_000)
    args = parser.parse_args()

    from ftflow import paths, runner
    from ftflow.config.schema import Tokenizer
    from ftflow.pack.io import conversations
    from ftflow.pack.templates import template_text
    from ftflow.pack.tokenizer import render, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="ftflow-bench-pack-"))
    try:
        write_raw(work / paths.RAW / "alpaca" / "alpaca.jsonl", args.conversations)
        runner.run("normalize", {"data": {"sources": [{"name": "alpaca", "path": "x", "reader": "alpaca"}]}}, work)
        convs = conversations(work / paths.NORMALIZE / "train.parquet")
        texts = render(convs, template_text("chatml"))
        tok = train_tokenizer(texts + vocab_corpus(), Tokenizer(source="train", vocab_size=args.vocab), "<|im_end|>")
        tok.chat_template = template_text("chatml")
        tok.save_pretrained(work / paths.MODELS / "bench")
        print(f"data: {len(convs):,} alpaca conversations; byte-level BPE, {len(tok):,} tokens; "
              f"ChatML; max_length {args.max_length}; {os.cpu_count()} cores\n")  # fmt: skip

        enc, raw_s = timed(lambda: tok(texts, add_special_tokens=False)["input_ids"])
        raw_tokens = sum(map(len, enc))
        trl_tokens, trl_s = trl_prepare(convs, tok, args.max_length)
        cfg = {
            "model": {"name": "bench", "source": "local", "path": "unused"},
            "tokenizer": {"source": "model"},
            "template": {"name": "chatml"},
            "pack": {"max_length": args.max_length},
        }
        stats, ft_s = timed(lambda: runner.run("pack", cfg, work))
        train = stats["splits"]["train"]

        print(f"{'':40}{'seconds':>9}{'tokens':>13}{'tokens/s':>12}")
        for name, tokens, sec in [("raw tokenizer batch encode", raw_tokens, raw_s),
                                  ("TRL SFTTrainer dataset preparation", trl_tokens, trl_s),
                                  ("ftflow pack", train["tokens"], ft_s)]:  # fmt: skip
            print(f"{name:40}{sec:9.2f}{tokens:13,}{tokens / sec:12,.0f}")
        ft_rate = train["tokens"] / ft_s
        print(f"\nftflow / raw tokenizer = {ft_rate / (raw_tokens / raw_s):.2f}x   (target >= 0.8x)")
        print(f"ftflow / TRL           = {ft_rate / (trl_tokens / trl_s):.2f}x   (target >= 2.5x)")
        print(f"ftflow packing efficiency = {train['packing_efficiency']:.2%}   (target >= 99.5%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
