"""`ftflow inspect`: look at packed rows the way the trainer sees them.

Each sequence of a row is decoded in runs of trained and masked tokens. On a terminal the
trained tokens are green and the masked ones dim; elsewhere the trained text is wrapped in
«...». It is the first thing to check when a model never stops talking (is the end-of-turn
token trained?) or learns to parrot prompts (is the prompt masked?).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ftflow import paths
from ftflow.pack.encode import IGNORE_INDEX

GREEN, DIM, RESET = "\033[32;1m", "\033[2m", "\033[0m"


def runs(labels: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, end, trained) runs of a sequence's labels."""
    trained = labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(labels)]
    return [(a, b, bool(trained[a])) for a, b in zip(bounds, bounds[1:]) if b > a]


def show_sequence(ids: np.ndarray, labels: np.ndarray, tok, color: bool) -> str:
    out = []
    for a, b, trained in runs(labels):
        text = tok.decode(ids[a:b].tolist(), clean_up_tokenization_spaces=False)
        if color:
            out.append((GREEN if trained else DIM) + text + RESET)
        else:
            out.append(f"«{text}»" if trained else text)
    return "".join(out)


def summary(stats: dict, split: str) -> str:
    s = stats["splits"].get(split)
    if not s:
        return f"{split}: no rows (no source feeds this split)"
    dropped = {k: v for k, v in s.items() if k.startswith(("dropped", "over_")) and v}
    if "conversations" not in s:  # preference, unpaired or prompt rows: one record per row
        return (f"{split}: {s['records']:,} records -> {s['rows']:,} rows; {s['tokens']:,} tokens"
                + (f"; {json.dumps(dropped)}" if dropped else ""))  # fmt: skip
    return (f"{split}: {s['conversations']:,} conversations -> {s['sequences']:,} sequences in {s['rows']:,} rows of "
            f"<= {stats['max_length']} tokens; {s['tokens']:,} tokens, {s['trained_tokens']:,} trained; "
            f"packing efficiency {s['packing_efficiency']:.2%}" + (f"; {json.dumps(dropped)}" if dropped else "")
            + masks_line(stats, s))  # fmt: skip


def masks_line(stats: dict, s: dict) -> str:
    """How the loss masks were made and what they train (pack's masking audit)."""
    audit, masks = s.get("mask_audit"), stats.get("masks")
    if not audit or not masks:
        return ""
    shares = ", ".join(f"{role} {share:.1%}" for role, share in audit["trained_token_share_by_role"].items())
    return (
        f"\nmasks: {masks['method']} (train_on {masks['train_on']}); trained tokens by role: {shares}; "
        f"{audit['turns_ending_on_end_of_turn']:,} trained turns, each ending on its end-of-turn token; "
        f"{audit['conversations_without_trained_token']:,} conversations with no trained token"
        + reasoning_note(audit)
        + modes_note(audit)
    )


def modes_note(audit: dict) -> str:
    """train_on auto / each_turn: how many conversations were trained whole and how many per turn."""
    modes = audit.get("conversations_by_mode")
    if not modes:
        return ""
    if not modes["each_turn"]:
        return f"; all {modes['whole']:,} conversations trained whole"
    return (f"; {modes['whole']:,} conversations trained whole, {modes['each_turn']:,} one sequence per turn "
            f"({audit['each_turn_sequences']:,} sequences repeating {audit['each_turn_repeated_prompt_chars']:,} "
            "characters of prompt)")  # fmt: skip


def reasoning_note(audit: dict) -> str:
    left_out, carrying = audit.get("reasoning_not_in_rendered_text", 0), audit.get("messages_with_reasoning", 0)
    return f"; reasoning left out by the template in {left_out:,} of {carrying:,} messages" if carrying else ""


def inspect(packed: Path = Path(paths.PACK) / "train", rows: int = 2, color: bool | None = None) -> str:
    import datasets
    from transformers import AutoTokenizer

    packed = Path(packed)
    color = sys.stdout.isatty() if color is None else color
    tok = AutoTokenizer.from_pretrained(packed.parent / "tokenizer")
    stats = json.loads((packed.parent / "stats.json").read_text())
    lines = [summary(stats, packed.name)]
    if not stats["splits"].get(packed.name):
        return "\n".join(lines)
    legend = f"{GREEN}trained{RESET} / {DIM}masked{RESET}" if color else "«trained» / masked"
    lines.append(legend)
    ds = datasets.load_from_disk(str(packed))
    if "prompt_ids" in ds.column_names:
        lines += [show_pair_row(ds[r], r, tok, color) for r in range(min(rows, len(ds)))]
        return "\n".join(lines)
    for r in range(min(rows, len(ds))):
        row = ds[r]
        ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
        lines.append(f"\n=== row {r}: {len(row['seq_lengths'])} sequences, {len(ids)} tokens ===")
        start = 0
        for k, n in enumerate(row["seq_lengths"]):
            trained = int(np.count_nonzero(labels[start : start + n] != IGNORE_INDEX))
            lines.append(f"--- sequence {k} ({n} tokens, {trained} trained) ---")
            lines.append(show_sequence(ids[start : start + n], labels[start : start + n], tok, color))
            start += n
    return "\n".join(lines)


def show_pair_row(row: dict, r: int, tok, color: bool) -> str:
    """One preference / unpaired / prompt row: the prompt (never trained), then each completion
    (chosen and rejected side by side in turn, or the one completion with its label); prompt
    rows have no completion (GRPO generates them) but a reference answer."""
    lines = [f"\n=== row {r} ==="]
    prompt = np.asarray(row["prompt_ids"])
    lines.append(f"--- prompt ({len(prompt)} tokens, masked) ---")
    lines.append(show_sequence(prompt, np.full(len(prompt), IGNORE_INDEX), tok, color))
    for column in sorted(c for c in row if c.endswith("_ids") and c != "prompt_ids"):
        ids = np.asarray(row[column])
        what = column.removesuffix("_ids") + (f" (label {row['label']})" if "label" in row else "")
        lines.append(f"--- {what}: {len(ids)} tokens, trained ---")
        lines.append(show_sequence(ids, ids, tok, color))
    if "answer" in row:
        lines.append(f"--- reference answer (the rewards compare completions with it) ---\n{row['answer']}")
    return "\n".join(lines)
