"""The pack stage: conversations -> chat template -> token ids + loss masks -> packed rows.

The tokenizer is the base model's, or (tokenizer.source=train, for scratch models) a byte-level
BPE trained here on the rendered training conversations. The template is the tokenizer's own
(template=model) or one shipped in pack/templates/ (chatml, llama3).

Tokens are exactly what `tokenizer.apply_chat_template(messages, tools=..., tokenize=True)`
gives, and the loss mask exactly its `return_assistant_tokens_mask` (the template's
{% generation %} spans), computed the same way (transformers' renderer, then the fast
tokenizer on the rendered text) but for many conversations at once: one Rust batch encode per
chunk, and the token/span overlap done with numpy on the whole chunk instead of a Python loop
per token. Rows are best-fit-decreasing bins of whole sequences (or one sequence per row with
pack.strategy=none); each row keeps `seq_lengths`, from which the collator rebuilds
per-sequence position ids, so attention never crosses a sequence boundary.

    io.py         normalize's files in pieces; rows saved as datasets
    tokenizer.py  the base model's tokenizer, or one trained here
    templates/    ftflow's chat templates: the Jinja files and their plain-Python twins
    spans.py      a model's own template rendered with the exact character span of each turn
    encode.py     tokens and loss masks for a chunk of conversations
    packing.py    overflow policy, best-fit-decreasing rows, shards, worker processes
    pairs.py      DPO / KTO / GRPO rows
    inspect.py    `ftflow inspect`: packed rows with trained tokens marked
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ftflow import integrity, paths
from ftflow.config.params import write_stage_config
from ftflow.config.schema import StageConfig
from ftflow.pack.encode import span_method
from ftflow.pack.inspect import modes_note
from ftflow.pack.packing import pack_split
from ftflow.pack.tokenizer import build_tokenizer
from ftflow.paths import PACKED_SPLITS

log = logging.getLogger(__name__)


LOST_TOKENS_WARNING = 0.05  # share of a split's tokens cut off by the overflow policy


def warn_lost_tokens(split: str, stats: dict, max_length: int) -> None:
    lost = stats.get("tokens_lost_to_overflow", 0)
    before = stats.get("tokens", 0) + lost
    if before and lost / before > LOST_TOKENS_WARNING:
        log.warning("%s: pack.overflow=%s threw away %d of %d tokens (%.0f%%; %d of them trained) in %d sequences "
                    "over max_length=%s: raise max_length or set pack.overflow=split", split, stats["overflow"],
                    lost, before, 100 * lost / before, stats.get("trained_tokens_lost_to_overflow", 0),
                    stats.get("over_max_length", 0), max_length)  # fmt: skip


def warn_unrendered_reasoning(split: str, audit: dict, template: str) -> None:
    left_out = audit.get("reasoning_not_in_rendered_text", 0)
    if left_out:
        log.warning("%s: the chat template (%s) leaves out the reasoning of %d of the %d messages that carry "
                    "some: it is not trained (stats.json mask_audit; template=model for a model whose template "
                    "renders reasoning)", split, template, left_out, audit["messages_with_reasoning"])  # fmt: skip


def say_turn_modes(split: str, audit: dict) -> None:
    if (audit.get("conversations_by_mode") or {}).get("each_turn"):
        log.info("%s: %s (the chat template renders their turns differently once later messages follow)", split,
                 modes_note(audit).removeprefix("; "))  # fmt: skip


def normalized_files(in_dir: Path) -> dict[Path, str]:
    """normalize's split files and the sha256 it recorded of each ({} without its stats)."""
    stats = in_dir / "stats.json"
    if not stats.exists():
        return {}
    splits = json.loads(stats.read_text())["splits"]
    return {in_dir / f"{split}.parquet": s["sha256"] for split, s in splits.items() if s.get("sha256")}


def pack(cfg: StageConfig, root: Path = Path(".")) -> dict:
    """Run the stage on its config (model, tokenizer, template, pack)."""
    model, tok_cfg, tpl, pack_cfg = cfg.model, cfg.tokenizer, cfg.template, cfg.pack
    in_dir, out_dir = root / paths.NORMALIZE, root / paths.PACK
    integrity.check(normalized_files(in_dir), "normalize", "Run normalize again (`ftflow normalize`).")
    tok = build_tokenizer(model, tok_cfg, tpl, in_dir / "train.parquet", root)
    tok.save_pretrained(out_dir / "tokenizer")
    # how the loss masks were made (the audit per split counts what they trained, before max_length)
    masks = {"method": span_method(tok), "train_on": pack_cfg.train_on, "template_of": str(tok.name_or_path)}
    stats = {"vocab_size": len(tok), "max_length": pack_cfg.max_length, "masks": masks, "splits": {}}
    for split in PACKED_SPLITS:
        log.info("Tokenizing and packing <%s>", split)
        # written even with no rows: the stage's outputs are fixed
        split_stats = pack_split(in_dir / f"{split}.parquet", tok, pack_cfg, out_dir / split)
        if split_stats:
            stats["splits"][split] = split_stats
            log.info("Packed %s: %s", split, json.dumps(split_stats))
            warn_unrendered_reasoning(split, split_stats.get("mask_audit") or {}, masks["template_of"])
            say_turn_modes(split, split_stats.get("mask_audit") or {})
            warn_lost_tokens(split, split_stats, pack_cfg.max_length)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    write_stage_config(cfg.sections, out_dir)
    return stats
