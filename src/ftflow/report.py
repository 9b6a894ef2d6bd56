"""report: the run at a glance, as files that Snakemake's report embeds (`ftflow report`, or
`snakemake --report results/report.html`).

It reads what the stages wrote and recomputes nothing, so every figure in the report is the
figure on disk. results/report/ holds:

    normalize.html   records per source and split: read, kept, dropped per reason; columns not read
    pack.html        per split: conversations, sequences, rows, tokens, packing efficiency,
                     sequences over max_length (truncated or dropped), no trained token
    loss.svg         training and validation loss per step (log scale), learning rate, gradient norm
    eval.html        base vs tuned per task and metric, with the difference
    provenance.html  what produced the model: git commit, the config of every stage, the
                     hashes of the data and of the files training read, package versions
    summary.yaml     the headline figures on the report's first page (see inputs.report_headline())
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jinja2 import Environment

from ftflow import freshness, paths
from ftflow.config.params import PARAMS_FILE, read_params
from ftflow.train import curve

log = logging.getLogger(__name__)

HTML = "results/report.html"  # `ftflow report` writes the report here


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""


def kind(value) -> str:
    """A cell's class: figures align right, long or multi-line text is set as code."""
    text = str(value)
    if re.fullmatch(r"[+-]?[\d,]+(\.\d+)?%?", text):
        return "number"
    return "text" if len(text) > 40 or "\n" in text else ""


ENV = Environment(autoescape=True)
ENV.filters["kind"] = kind
PAGE = ENV.from_string("""\
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
  body { font: 14px/1.45 system-ui, sans-serif; color: #1f2328; margin: 1.2em; }
  h1 { font-size: 1.3em; margin: 0 0 .6em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; margin-bottom: .4em; }
  th, td { border-bottom: 1px solid #d0d7de; padding: .3em .8em; text-align: left; white-space: nowrap; }
  th { background: #f6f8fa; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
  td.text { font-family: ui-monospace, monospace; white-space: pre-wrap; }
  p.note { color: #59636e; margin: 0; }
</style></head>
<body><h1>{{ title }}</h1>
{% for t in tables %}
<h2>{{ t.title }}</h2>
<table><thead><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in t.rows %}<tr>{% for v in row %}<td class="{{ v|kind }}">{{ v }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% if t.note %}<p class="note">{{ t.note }}</p>{% endif %}
{% endfor %}
</body></html>
""")


def page(title: str, tables: list[Table]) -> str:
    return PAGE.render(title=title, tables=tables)


def count(n: int) -> str:
    return f"{n:,}"


def share(x: float) -> str:
    return f"{100 * x:.2f}%"


def score(x: float) -> str:
    return f"{x:.4f}"


# --- sections --------------------------------------------------------------------------------


def normalize_table(stats: dict) -> Table:
    """One row per source (and a total per split); one column per drop reason that occurred."""
    splits = stats["splits"]
    reasons = sorted({r for s in splits.values() for src in s["sources"].values() for r in src["dropped"]})
    table = Table("Records per source", ["split", "source", "reader", "read", "kept", "dropped", *reasons])
    for split, s in splits.items():
        for name, src in s["sources"].items():
            dropped = src["dropped"]
            table.rows.append([split, name, src["reader"], count(src["records_in"]), count(src["records_out"]),
                               count(sum(dropped.values())), *(count(dropped.get(r, 0)) for r in reasons)])  # fmt: skip
        if len(s["sources"]) > 1:
            table.rows.append([split, "(all)", "", count(s["records_in"]), count(s["records_out"]),
                               count(sum(s["dropped"].values())), *(count(s["dropped"].get(r, 0)) for r in reasons)])  # fmt: skip
    table.note = f"kind: {stats['kind']}. read = kept + dropped, for every source."
    if not reasons:
        table.note += " No record was dropped."
    for split, s in splits.items():
        if "carved" in s:
            table.note += " " + carved_note(split, s)
        if "carved_out" in s:
            table.note += f" {split}: {count(s['rows'])} records left after carving."
        for name, src in s["sources"].items():
            table.note += unread_note(name, src)
    return table


def unread_note(name: str, src: dict) -> str:
    """The columns a source's reader did not read, with the records that had content in them."""
    unread = src.get("unread_columns")
    if not unread:
        return ""
    listed = ", ".join(f"{column} ({count(n)} of {count(src['records_in'])})" for column, n in unread.items())
    return f" Not read by {src['reader']} in source {name} (not trained on): {listed}."


def carved_note(split: str, s: dict) -> str:
    """How a carved split was made: "test: 3 records carved from train (data.test_size=0.1, by ...)"."""
    carved = s["carved"]
    size = next(f"{k}={v}" for k, v in carved.items() if k.startswith("data."))
    return f"{split}: {count(s['rows'])} records carved from {carved['from']} ({size}, {carved['how']})."


PACK_COLUMNS = {
    "conversations": "conversations",
    "sequences": "sequences",
    "rows": "packed rows",
    "tokens": "tokens",
    "trained_tokens": "trained tokens",
    "packing_efficiency": "packing efficiency",
    "over_max_length": "over max_length",
    "tokens_lost_to_overflow": "tokens cut off",
    "dropped_no_target": "no trained token",
}


def pack_table(stats: dict) -> Table:
    """One row per packed split: what went in, how many rows it became, how full they are."""
    table = Table(f"Packed splits (max_length {stats['max_length']}, vocabulary {count(stats['vocab_size'])})",
                  ["split", *PACK_COLUMNS.values()])  # fmt: skip
    for split, s in stats["splits"].items():
        cells = [share(s[k]) if k == "packing_efficiency" else count(s[k]) if k in s else "" for k in PACK_COLUMNS]
        table.rows.append([split, *cells])
    masks = stats.get("masks")  # how pack made the loss masks (spans.py)
    if masks:
        table.note = (
            f"loss masks: {masks['method']} (train_on {masks['train_on']}, template of {masks['template_of']}). "
        )
        for split, s in stats["splits"].items():
            table.note += turn_modes_note(split, s.get("mask_audit") or {})
    table.note += ("packing efficiency: the share of the packed rows' token slots that hold tokens (not "
                  "padding). over max_length: sequences longer than max_length, truncated, dropped or split as pack.overflow "
                  "says (tokens cut off: by truncate or drop; split keeps them). no trained token: sequences dropped because nothing in them is trained on.")  # fmt: skip
    return table


def turn_modes_note(split: str, audit: dict) -> str:
    """pack.train_on auto / each_turn: conversations trained whole and one sequence per turn."""
    modes = audit.get("conversations_by_mode")
    if not modes:
        return ""
    if not modes["each_turn"]:
        return f"{split}: all {count(modes['whole'])} conversations trained whole. "
    return (f"{split}: {count(modes['whole'])} conversations trained whole, {count(modes['each_turn'])} one "
            f"sequence per turn ({count(audit['each_turn_sequences'])} sequences). ")  # fmt: skip


def loss_figure(rows: list[dict], out: Path) -> dict:
    """loss.svg: training and validation loss (log scale), learning rate and gradient norm
    against the step."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "ftflow"  # stable element ids (else random per run)
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, and smaller
    import matplotlib.pyplot as plt

    # a panel per metric, a line per split (validation: the loss only, at its own steps)
    lines = {"loss": [("train", "training loss"), ("validation", "validation loss")],
             "learning_rate": [("train", "learning rate")], "grad_norm": [("train", "gradient norm")]}  # fmt: skip
    panels = {metric: [(label, pts) for split, label in splits if (pts := curve.series(rows, split, metric))]
              for metric, splits in lines.items()}  # fmt: skip
    panels = {metric: found for metric, found in panels.items() if found}
    rows_ = max(1, len(panels))  # an empty curve still gets its (empty) panel and title
    fig, axes = plt.subplots(rows_, 1, figsize=(7, 1.2 + 1.9 * rows_), sharex=True, squeeze=False)
    for ax, (metric, found) in zip(axes[:, 0], panels.items()):
        for label, points in found:
            ax.plot(*zip(*points), marker="o" if len(points) < 40 else None, markersize=3, linewidth=1.5, label=label)
        if metric == "loss" and min(v for _, pts in found for _, v in pts) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(found[0][0] if len(found) == 1 else "loss")
        if len(found) > 1:
            ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    losses, validation = curve.series(rows, "train", "loss"), curve.series(rows, "validation", "loss")
    figures, title = {}, "no training loss was logged"
    if losses:  # train logs its first and last steps, so only a run of no step has none
        figures = {"steps": losses[-1][0], "first_loss": losses[0][1], "final_loss": losses[-1][1]}
        title = f"loss {figures['first_loss']:.4g} at step {losses[0][0]} → {figures['final_loss']:.4g} at step {figures['steps']}"
    if validation:
        figures["validation_loss"], figures["validation_step"] = validation[-1][1], validation[-1][0]
        title += f"; validation {figures['validation_loss']:.4g} at step {figures['validation_step']}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, format="svg", metadata={"Date": None})  # no date: the same curve, the same file
    plt.close(fig)
    return figures


def eval_table(comparison: list[dict]) -> Table:
    """comparison.json (one entry per score and model) as base | tuned | delta per score."""
    scores: dict[str, dict[str, float]] = {}
    for entry in comparison:
        scores.setdefault(entry["score"], {})[entry["model"]] = entry["value"]
    table = Table("Base vs tuned", ["task", "metric", "base", "tuned", "delta"])
    for name, by_model in scores.items():
        task, metric = name.rsplit("/", 1)
        base, tuned = by_model.get("base"), by_model.get("tuned")
        delta = f"{tuned - base:+.4f}" if base is not None and tuned is not None else ""
        table.rows.append(
            [task, metric, "" if base is None else score(base), "" if tuned is None else score(tuned), delta]
        )
    table.note = ("Scores on held-out data (lm-eval's tasks; holdout: the test split answered with each model's "
                  "chat template, results/eval/<model>/holdout.jsonl); base: the model before training, tuned: "
                  "the consolidated model. holdout loss/perplexity: per token of the reference turns, lower is better.")  # fmt: skip
    if not comparison:
        table.note = "Not evaluated (eval=none, or eval.tasks is empty)."
    return table


def contamination_table(found: dict) -> Table:
    """contamination.json: per task, its examples that also occur in the training data."""
    table = Table("Contamination: evaluation examples also in the training data",
                  ["task", "examples", "whole text", f"{found['ngram']}-word run", "share", "flagged"])  # fmt: skip
    for task, t in found["tasks"].items():
        table.rows.append([task, count(t["examples"]), count(t["exact"]), count(t["ngram"]), share(t["share"]),
                           "FLAGGED" if t["flagged"] else ""])  # fmt: skip
    table.note = (f"An example counts when its whole text occurs in a training record, or when it shares a run of "
                  f"{found['ngram']} words with one (lowercased, punctuation ignored); its score then measures memory. "
                  f"Flagged: more than {share(found['flag_above'])} of a task's examples. The examples and the "
                  "training record ids: results/eval/contamination.jsonl.")  # fmt: skip
    if not found.get("checked"):
        table.note = "Not checked (eval.contamination.check=false, or nothing evaluated)."
    return table


def contamination_line(found: dict) -> str:
    """The report's first page: "none found in 2 tasks" or the tasks with overlap."""
    hit = {task: t for task, t in found["tasks"].items() if t["ngram"]}
    if not found.get("checked"):
        return "not checked"
    if not hit:
        return f"none found ({len(found['tasks'])} task(s) checked against {count(found['train_records'])} records)"
    return "; ".join(f"{task} {count(t['ngram'])} of {count(t['examples'])} examples"
                     + (" (FLAGGED)" if t["flagged"] else "") for task, t in hit.items())  # fmt: skip


def provenance_tables(prov: dict, train_summary: dict, consolidated: dict, manifest: dict,
                      normalized: dict, stage_configs: dict[str, str]) -> list[Table]:  # fmt: skip
    """What produced the model: code, config, data."""
    git = prov.get("git") or {}
    commit = git.get("commit") or "(not a git checkout)"
    code = Table("Code and run", ["what", "value"], [
        ["git commit", commit + (f" with uncommitted changes to {', '.join(git.get('changed') or ['tracked files'])}: "
                                 f"{paths.CHECKPOINTS}/{train_summary.get('config_fingerprint')}/git.diff"
                                 if git.get("dirty") else "")],  # fmt: skip
        ["config fingerprint (train)", train_summary.get("config_fingerprint", "")],
        ["method", train_summary.get("method", "")],
        ["steps", count(train_summary["steps"]) if "steps" in train_summary else ""],
        ["resumed from", train_summary.get("resumed_from") or "(a fresh run)"],
        ["trainable parameters", count(train_summary["trainable_params"]) if "trainable_params" in train_summary else ""],
        ["consolidated model", f"{count(consolidated['parameters'])} parameters, merged LoRA: {consolidated.get('merged_lora')}"],
        ["consolidation check", verification(consolidated.get("verification") or {})],
    ])  # fmt: skip
    data = Table("Data", ["what", "sha256"], note="Raw files as downloaded (data/manifest.json), normalized splits "
                 "(results/normalize/stats.json), and the inputs training read (results/train/model/provenance.json).")  # fmt: skip
    for kind in ("sources", "models"):
        for name, entry in sorted(manifest.get(kind, {}).items()):
            where = entry.get("uri", "") + (f"@{entry['revision']}" if entry.get("revision") else "")
            for file, digest in sorted(entry.get("files", {}).items()):
                data.rows.append([f"{kind[:-1]} {name}: {where} / {file}", digest])
    for split, s in normalized["splits"].items():
        data.rows.append([f"normalized {split} ({count(s['rows'])} rows)", s["sha256"]])
    for path, digest in sorted((prov.get("inputs") or {}).items()):
        data.rows.append([f"training input {path}", digest])
    config = Table("Config of each stage (the config.yaml it wrote beside its outputs)", ["stage", "config"],
                   [[stage, text] for stage, text in stage_configs.items()])  # fmt: skip
    packages = Table("Packages", ["package", "version"],
                     [[k, v or "(not installed)"] for k, v in sorted((prov.get("packages") or {}).items())],
                     note=environment_note(prov.get("environment") or {}))  # fmt: skip
    return [code, data, config, packages]


def environment_note(env: dict) -> str:
    """Whether training ran in the environment of the lock file, or in which packages not."""
    if not env.get("lock"):
        return "No lock file beside the run: the environment is not checked against one."
    differs = env.get("differs") or {}
    where = f"{env['lock']} (sha256 {env['lock_sha256'][:16]})"
    if not differs:
        return f"The environment is exactly {where}."
    shown = ", ".join(
        f"{n} {d['installed'] or '(missing)'} (lock {d['lock']})" for n, d in sorted(differs.items())[:12]
    )
    return f"The environment DIFFERS from {where} in {len(differs)} packages: {shown}" + (
        ", ..." if len(differs) > 12 else ""
    )


def verification(v: dict) -> str:
    if not v:
        return ""
    state = "ok" if v.get("ok") else "FAILED"
    return f"{state}: max |log p difference| {v['max_abs_logprob_diff']:.3g} (tolerance {v['tolerance']:g}) over {v['positions']} positions"


def summary(normalized: dict, packed: dict, figures: dict, train_summary: dict, evaluation: Table, prov: dict,
            found: dict) -> dict:  # fmt: skip
    """The headline figures of the report's first page: {label: text}."""
    out = {}
    for split, s in normalized["splits"].items():
        if s["records_in"]:
            out[f"{split} records kept"] = f"{count(s['records_out'])} of {count(s['records_in'])}"
        if "carved_out" in s:
            out[f"{split} records kept"] += (
                f" ({count(s['rows'])} left after carving "
                + ", ".join(f"{count(n)} into {name}" for name, n in s["carved_out"].items())
                + ")"
            )
        if "carved" in s:
            out[f"{split} records"] = carved_note(split, s).partition(": ")[2].rstrip(".")
    for split, s in packed["splits"].items():
        out[f"{split} packing"] = (
            f"{count(s['tokens'])} tokens in {count(s['rows'])} rows, {share(s['packing_efficiency'])} full"
        )
    out["training loss"] = (f"{figures['first_loss']:.4g} → {figures['final_loss']:.4g} (logged at step "
                            f"{count(figures['steps'])} of {count(train_summary['steps'])})" if "steps" in figures
                            else "none logged")  # fmt: skip
    if "validation_loss" in figures:
        out["validation loss"] = f"{figures['validation_loss']:.4g} at step {count(figures['validation_step'])}"
    for task, metric, base, tuned, delta in evaluation.rows:
        out[f"{task}/{metric}"] = f"{base} → {tuned} ({delta})"
    if not evaluation.rows:
        out["evaluation"] = "none (eval=none)"
    out["contamination"] = contamination_line(found)
    out["git commit"] = (prov.get("git") or {}).get("commit") or "(not a git checkout)"
    return out


# --- the stage -------------------------------------------------------------------------------


def read_json(path: Path):
    return json.loads(path.read_text())


def report(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage: write results/report/ from the other stages' outputs (`cfg` is empty),
    each of them made by the config in params.yaml (else StaleResults names the stage and keys)."""
    freshness.check_current(read_params(root / PARAMS_FILE)[0], root)
    (root / paths.REPORT).mkdir(parents=True, exist_ok=True)
    out = {name: root / paths.REPORT / file for name, file in paths.REPORT_FILES.items()}
    normalized = read_json(root / paths.NORMALIZE / "stats.json")
    packed = read_json(root / paths.PACK / "stats.json")
    prov = read_json(root / paths.TRAIN / "model" / "provenance.json")
    evaluation = eval_table(read_json(root / paths.EVALUATE / "comparison.json"))
    found = read_json(root / paths.EVALUATE / "contamination.json")
    stage_configs = {stage: (root / folder / "config.yaml").read_text()
                     for stage, folder in freshness.FOLDERS.items() if (root / folder / "config.yaml").exists()}  # fmt: skip

    out["normalize"].write_text(page("normalize: records per source", [normalize_table(normalized)]))
    out["pack"].write_text(page("pack: tokens and packing", [pack_table(packed)]))
    figures = loss_figure(curve.read(root / paths.TRAIN / "loss.csv"), out["loss"])
    out["evaluate"].write_text(page("evaluate: base vs tuned", [evaluation, contamination_table(found)]))
    train_summary = read_json(root / paths.TRAIN / "summary.json")
    tables = provenance_tables(prov, train_summary,
                               read_json(root / paths.CONSOLIDATE / "summary.json"),
                               read_json(root / paths.MANIFEST), normalized, stage_configs)  # fmt: skip
    out["provenance"].write_text(page("provenance of the model", tables))
    headline = summary(normalized, packed, figures, train_summary, evaluation, prov, found)
    out["summary"].write_text(yaml.safe_dump(headline, sort_keys=False, allow_unicode=True))
    log.info("Report files in %s: %s", paths.REPORT, ", ".join(paths.REPORT_FILES.values()))
    return headline
