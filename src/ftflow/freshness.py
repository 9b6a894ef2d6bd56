"""Whether the results on disk were made by the current config. Each stage writes the exact config
it ran with as config.yaml beside its outputs; here that record is compared with what the
current config gives the stage, key by key. Two uses:

- before a run, `ftflow run` says which stages the change reaches and which keys changed, old and
  new value (`train: train.learning_rate: 0.001 -> 0.0005`), instead of Snakemake's dump of a
  whole section;
- before results are shown (after `ftflow run`, by the report stage whichever door ran it,
  `ftflow chat` on the pipeline's model), results whose record differs from the current config
  are refused, naming the stage and the keys: whatever Snakemake or DVC decided, a result is
  never presented under a config that did not make it.

Sections a stage reads but that change nothing it writes (Stage.read_at_run: train's tracking)
are not compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftflow import paths, stages
from ftflow.config.params import load_yaml, rule_params, without_run_time
from ftflow.errors import StageError

FOLDERS = paths.RECORDING  # the stages that record their config beside their outputs, upstream first


class StaleResults(StageError):
    pass


def recorded(stage: str, root: Path = Path(".")) -> dict | None:
    """The config the stage's outputs on disk were made with (None: no outputs yet)."""
    path = root / FOLDERS[stage] / "config.yaml"
    if not path.exists():
        return None
    return without_run_time(load_yaml(path.read_text()) or {}, stage)


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}: data.sources[0].path."""
    if isinstance(value, dict) and value:
        return {
            k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}" if prefix else key).items()
        }
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def changed_keys(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for each key whose value differs (a key only one side has: `(none)`)."""
    before, after = flat(old), flat(new)
    keys = sorted((k for k in set(before) | set(after) if before.get(k, "(none)") != after.get(k, "(none)")),
                  key=lambda k: (k not in before or k not in after, k))  # values changed first, then keys added or gone  # fmt: skip
    return [f"{k}: {shown(before.get(k, '(none)'))} -> {shown(after.get(k, '(none)'))}" for k in keys]


def shown(value: Any) -> str:
    """A value as an override writes it (null, true)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def changes(tree: dict, root: Path = Path(".")) -> dict[str, list[str]]:
    """{stage: changed keys} for every stage whose outputs on disk were made by another config."""
    out = {}
    for stage in FOLDERS:
        made_by = recorded(stage, root)
        if made_by is not None:
            found = changed_keys(made_by, rule_params(tree, stage))
            if found:
                out[stage] = found
    return out


def describe(found: dict[str, list[str]], limit: int = 6) -> list[str]:
    """One line per stage: `train: train.learning_rate: 0.001 -> 0.0005; ...`."""
    lines = []
    for stage, keys in found.items():
        more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
        lines.append(f"{stage}: {'; '.join(keys[:limit])}{more}")
    return lines


def before(stage: str) -> list[str]:
    """The recording stages upstream of `stage` (what a stage run by hand reads)."""
    order = stages.NAMES
    return [s for s in FOLDERS if order.index(s) < order.index(stage)]


def check_current(tree: dict, root: Path = Path("."), only: list[str] | None = None,
                  sections: tuple[str, ...] | None = None) -> None:  # fmt: skip
    """Refuse results made by another config than `tree` (every recorded stage's, or `only`
    those; only the keys of `sections` when given: a stage run by hand cares for what it reads
    itself), naming the stage and the keys."""
    found = {}
    for stage, keys in changes(tree, root).items():
        keys = [k for k in keys if sections is None or k.split(".")[0].split("[")[0] in sections]
        if keys and (only is None or stage in only):
            found[stage] = keys
    if found:
        raise StaleResults(
            "results on disk were made by another config than the current one, and were not remade:\n  "
            + "\n  ".join(describe(found))
            + "\nRun the workflow with this config (`ftflow run [overrides]`, `dvc repro`) to remake them."
        )
