"""The training curve, results/train/loss.csv: one long table, a row per step, split and metric.
Training rows are the loss, learning rate and gradient norm the trainer logs every
train.logging_steps; validation rows are what each pass over the validation split gives (its
loss; DPO's and KTO's trainers add their reward metrics). The report and `dvc plots` read it.

No torch here: the report reads the curve too.
"""

from __future__ import annotations

import csv
from pathlib import Path

FIELDS = ("step", "split", "metric", "value")
TRAIN_METRICS = ("loss", "learning_rate", "grad_norm")
EVAL_PREFIX = "eval_"  # how the trainers name a validation pass's metrics in their logs
# what a validation pass logs about itself, not about the model
EVAL_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "num_tokens")


def rows(step: int, logs: dict) -> list[dict]:
    """The curve's rows of one log entry of the trainer."""
    out = []
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith(EVAL_PREFIX) and key[len(EVAL_PREFIX) :] not in EVAL_BOOKKEEPING:
            out.append({"step": step, "split": "validation", "metric": key[len(EVAL_PREFIX) :], "value": value})
        elif key in TRAIN_METRICS:
            out.append({"step": step, "split": "train", "metric": key, "value": value})
    # in name order: a resumed run's history comes back from trainer_state.json with its keys
    # sorted, and the curve must read the same as an uninterrupted run's
    return sorted(out, key=lambda r: (r["split"], r["metric"]))


def history_rows(history: list[dict]) -> list[dict]:
    """The whole curve from the trainer's log history (which a resumed run brings back)."""
    return [r for entry in history if "step" in entry for r in rows(entry["step"], entry)]


def append(path: Path, new: list[dict]) -> None:
    fresh = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if fresh:
            writer.writeheader()
        writer.writerows(new)


def write(path: Path, all_rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(all_rows)


def read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{**r, "step": int(r["step"]), "value": float(r["value"])} for r in csv.DictReader(f)]


def series(curve: list[dict], split: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of one split, in step order."""
    return [(r["step"], r["value"]) for r in curve if r["split"] == split and r["metric"] == metric]
