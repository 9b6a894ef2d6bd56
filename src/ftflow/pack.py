"""pack: conversations -> chat template -> token ids + assistant-only labels -> packed rows.

The tokenizer is the base model's, or (tokenizer.source=train, for scratch models) a byte-level
BPE trained here on the rendered training conversations. Loss masks come from the template's
{% generation %} blocks (transformers' `return_assistant_tokens_mask`), so the mask is exactly
the span the template says the model should produce. Packing is TRL's `pack_dataset`; each
packed row keeps `seq_lengths`, from which the collator rebuilds per-sequence position ids, and
attention never crosses a sequence boundary.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ftflow import paths
from ftflow.config import Model, Pack, StageError, Template, Tokenizer, write_stage_config

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the loss skips
PAD_TOKEN = "<|endoftext|>"
PACKED_SPLITS = ("train", "validation")  # test is for evaluate only


class PackError(StageError):
    pass


def chatml_template() -> str:
    return files("ftflow").joinpath("templates/chatml.jinja").read_text()


def conversations(parquet: Path) -> list[list[dict]]:
    """Normalized conversations as chat-template input (unset fields left out, tool calls in
    the {"type": "function", "function": {...}} form that chat templates expect)."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    if "messages" not in table.column_names:
        raise PackError(f"{parquet}: pack takes conversation data (data.kind=conversation); this file "
                        f"holds {[c for c in table.column_names if c not in ('id', 'source')]}")  # fmt: skip
    return [[_template_message(m) for m in row] for row in table.column("messages").to_pylist()]


def _template_message(m: dict) -> dict:
    out = {k: v for k, v in m.items() if v is not None}
    if "tool_calls" in out:
        out["tool_calls"] = [
            {"type": "function", "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
            for c in out["tool_calls"]
        ]
    return out


def train_tokenizer(texts: list[str], cfg: Tokenizer, eos_token: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: no unknown tokens) trained on the rendered conversations."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, "<|im_start|>", eos_token]
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos_token, pad_token=PAD_TOKEN)


def render(convs: list[list[dict]], template: str) -> list[str]:
    """Render with a plain tokenizer-less Jinja pass (needed before a tokenizer exists)."""
    probe = PreTrainedTokenizerFast(tokenizer_object=_empty_tokenizer(), eos_token="<|im_end|>")
    probe.chat_template = template
    return probe.apply_chat_template(convs, tokenize=False)


def _empty_tokenizer():
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    return RawTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def build_tokenizer(model: Model, tok_cfg: Tokenizer, tpl: Template, train_convs, root: Path):
    """The tokenizer every later stage uses, with the chat template set on it."""
    template = chatml_template() if tpl.name == "chatml" else None
    if tok_cfg.source == "train":
        log.info("Training a byte-level BPE tokenizer <vocab_size=%d> on %d conversations", tok_cfg.vocab_size, len(train_convs))
        tok = train_tokenizer(render(train_convs, template or chatml_template()), tok_cfg, tpl.eos_token)
    else:
        src = root / paths.base_model_dir(model.model_dump())
        log.info("Loading the tokenizer of <%s>", src)
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model.trust_remote_code)
    if template is not None:
        tok.chat_template = template
        missing = [t for t in ("<|im_start|>", tpl.eos_token) if t not in tok.get_vocab()]
        if missing:  # the base vocabulary lacks ChatML's markers; train resizes the embeddings
            tok.add_special_tokens({"additional_special_tokens": missing})
        tok.eos_token = tpl.eos_token
    elif not tok.chat_template or "{% generation %}" not in tok.chat_template.replace("{%- generation %}", "{% generation %}"):
        raise PackError(
            "template=model needs the tokenizer's chat template to mark assistant spans with "
            "{% generation %} ... {% endgeneration %}; this one does not. Use template=chatml."
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(convs: list[list[dict]], tok, cfg: Pack) -> tuple[datasets.Dataset, dict]:
    """Token ids and labels (IGNORE_INDEX outside trained spans); overflow truncated or dropped."""
    rows, truncated, dropped = [], 0, 0
    batch = 256
    for start in range(0, len(convs), batch):
        enc = tok.apply_chat_template(
            convs[start : start + batch], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        for ids, mask in zip(enc["input_ids"], enc["assistant_masks"]):
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
            if len(ids) > cfg.max_length:
                if cfg.overflow == "drop":
                    dropped += 1
                    continue
                truncated += 1
                ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1  # nothing left to learn from (the target was truncated away)
                continue
            rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise PackError("no conversation left after tokenization; raise pack.max_length")
    return datasets.Dataset.from_list(rows), {"truncated": truncated, "dropped": dropped}


def pack_split(ds: datasets.Dataset, cfg: Pack) -> tuple[datasets.Dataset, dict]:
    from trl import pack_dataset

    packed = pack_dataset(ds, seq_length=cfg.max_length, strategy=cfg.strategy)
    tokens = sum(len(x) for x in ds["input_ids"])
    stats = {
        "conversations": len(ds),
        "tokens": tokens,
        "trained_tokens": sum(sum(1 for t in x if t != IGNORE_INDEX) for x in ds["labels"]),
        "sequences": len(packed),
        # non-pad share of the token slots the trainer will see
        "packing_efficiency": round(tokens / (len(packed) * cfg.max_length), 4),
    }
    return packed, stats


def pack(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage; `cfg` is the stage's params (model, tokenizer, template, pack)."""
    model, tok_cfg = Model.model_validate(cfg["model"]), Tokenizer.model_validate(cfg["tokenizer"])
    tpl, pack_cfg = Template.model_validate(cfg["template"]), Pack.model_validate(cfg["pack"])
    in_dir, out_dir = root / paths.NORMALIZE, root / paths.PACK
    train_convs = conversations(in_dir / "train.parquet")
    tok = build_tokenizer(model, tok_cfg, tpl, train_convs, root)
    tok.save_pretrained(out_dir / "tokenizer")
    stats = {"vocab_size": len(tok), "max_length": pack_cfg.max_length, "splits": {}}
    for split in PACKED_SPLITS:
        convs = train_convs if split == "train" else conversations(in_dir / f"{split}.parquet")
        if not convs:  # no source feeds this split: an empty dataset keeps the outputs fixed
            datasets.Dataset.from_dict({"input_ids": [], "labels": [], "seq_lengths": []}).save_to_disk(str(out_dir / split))
            continue
        log.info("Tokenizing and packing <%s>: %d conversations", split, len(convs))
        ds, overflow = tokenize(convs, tok, pack_cfg)
        packed, split_stats = pack_split(ds, pack_cfg)
        packed.save_to_disk(str(out_dir / split))
        stats["splits"][split] = {**split_stats, **overflow}
        log.info("Packed %s: %s", split, json.dumps(stats["splits"][split]))
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    write_stage_config(cfg, out_dir)
    return stats
