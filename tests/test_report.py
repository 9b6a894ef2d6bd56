"""The run's report: Snakemake's own HTML report of the smoke run, each section checked against
the stage outputs it was made from, and the report rendered by headless Chromium. Also: progress
in log files (lines at a bounded rate) and on a terminal (bars)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from ftflow.train import curve

from helpers import browser, snakemake


class Tables(HTMLParser):
    """The tables of an HTML page: [[header cells], [row cells], ...] each, as text."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def records(table: list[list[str]]) -> list[dict[str, str]]:
    header, *rows = table
    return [dict(zip(header, row)) for row in rows]


def embedded(html: str, name: str):
    """A variable of the report's page (`var results = {...};`), parsed."""
    return json.loads(re.search(rf"^ *var {name} = (\{{.*\}}|\".*\");$", html, re.M)[1])


def content(entry: dict) -> str:
    return base64.b64decode(entry["data_uri"].split("base64,", 1)[1]).decode()


@pytest.fixture(scope="module")
def report(finished, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """`snakemake --report` on the finished smoke run, as a user types it."""
    html = tmp_path_factory.mktemp("report") / "report.html"
    snakemake("--report", str(html), cwd=finished)
    return html, embedded(html.read_text(), "results")


def stage_output(root: Path, path: str):
    text = (root / path).read_text()
    return json.loads(text) if path.endswith(".json") else text


def test_report_has_every_section_with_the_stage_figures(finished, report):
    html, results = report
    page = html.read_text()
    assert set(results) == {
        f"results/report/{n}" for n in ("normalize.html", "pack.html", "loss.svg", "eval.html", "provenance.html")
    }
    categories = embedded(page, "categories")
    assert list(categories) == ["1. Data", "2. Training", "3. Evaluation", "4. Provenance"]
    assert all(entry["caption"].startswith("<p>") for entry in results.values())  # each has its caption

    # normalize: records read, kept, dropped per source
    stats = stage_output(finished, "results/normalize/stats.json")
    (table,) = Tables(content(results["results/report/normalize.html"])).tables
    rows = {r["source"]: r for r in records(table)}
    sources = {name: s for split in stats["splits"].values() for name, s in split["sources"].items()}
    assert set(rows) == set(sources) == {"demo_train", "demo_validation", "demo_test"}
    for name, s in sources.items():
        assert (rows[name]["read"], rows[name]["kept"], rows[name]["dropped"]) == (
            f"{s['records_in']:,}",
            f"{s['records_out']:,}",
            f"{sum(s['dropped'].values()):,}",
        )
    assert rows["demo_train"]["read"] == "200"  # experiment=smoke: limit 200

    # pack: tokens, sequences, rows, packing efficiency, over max_length
    stats = stage_output(finished, "results/pack/stats.json")["splits"]["train"]
    (table,) = Tables(content(results["results/report/pack.html"])).tables
    row, _ = records(table)
    assert row["split"] == "train" and [r["split"] for r in records(table)] == ["train", "validation"]
    assert (row["tokens"], row["sequences"], row["packed rows"], row["over max_length"]) == (
        f"{stats['tokens']:,}",
        f"{stats['sequences']:,}",
        f"{stats['rows']:,}",
        f"{stats['over_max_length']:,}",
    )
    assert row["packing efficiency"] == f"{100 * stats['packing_efficiency']:.2f}%"

    # train: the training and validation loss, titled with the first and last logged (smoke:
    # a step logged each step, a validation pass every 2)
    rows = curve.read(finished / "results/train/loss.csv")
    train, validation = curve.series(rows, "train", "loss"), curve.series(rows, "validation", "loss")
    assert [s for s, _ in train] == [1, 2, 3, 4] and [s for s, _ in validation] == [2, 4]
    svg = content(results["results/report/loss.svg"])
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    (first, last), (step, final) = (train[0][1], train[-1][1]), validation[-1]
    assert f"loss {first:.4g} at step 1 → {last:.4g} at step 4; validation {final:.4g} at step {step}" in svg
    labels = ("training loss", "validation loss", "learning rate", "gradient norm", "step")
    assert all(label in svg for label in labels)
    summary = stage_output(finished, "results/train/summary.json")
    assert summary["final_validation_loss"] == final

    # evaluate: base, tuned and their difference per task and metric
    metrics = stage_output(finished, "results/eval/metrics.json")
    table, found = Tables(content(results["results/report/eval.html"])).tables
    shown = {f"{r['task']}/{r['metric']}": r for r in records(table)}
    scores = {k.split("/", 1)[1] for k in metrics}
    assert set(shown) == scores and len(scores) == 3
    for name, r in shown.items():
        base, tuned = metrics[f"base/{name}"], metrics[f"tuned/{name}"]
        assert (r["base"], r["tuned"], r["delta"]) == (f"{base:.4f}", f"{tuned:.4f}", f"{tuned - base:+.4f}")
    # and the contamination check of each task: the demo's splits share nothing
    checked = stage_output(finished, "results/eval/contamination.json")
    assert [(r["task"], r["examples"], r["whole text"], r["13-word run"], r["flagged"]) for r in records(found)] == [
        (task, str(t["examples"]), "0", "0", "") for task, t in checked["tasks"].items()]  # fmt: skip
    assert set(checked["tasks"]) == {"demo_words", "demo_words_choice"}

    # provenance: commit and config fingerprint, data hashes, every stage's config
    prov = json.loads((finished / "results/train/model/provenance.json").read_text())
    summary = stage_output(finished, "results/train/summary.json")
    code, data, config, packages = Tables(content(results["results/report/provenance.html"])).tables
    facts = dict(row for row in code[1:])
    assert facts["git commit"].startswith(prov["git"]["commit"] or "(not a git checkout)")
    assert facts["config fingerprint (train)"] == summary["config_fingerprint"]
    assert facts["consolidation check"].startswith("ok: ")
    hashes = {row[1] for row in data[1:]}
    manifest = stage_output(finished, "data/manifest.json")
    normalized = stage_output(finished, "results/normalize/stats.json")
    assert {d for s in manifest["sources"].values() for d in s["files"].values()} <= hashes
    assert {s["sha256"] for s in normalized["splits"].values()} <= hashes
    assert set(prov["inputs"].values()) <= hashes
    configs = dict(row for row in config[1:])
    assert configs["train"] == (finished / "results/train/config.yaml").read_text().strip()
    assert set(configs) == {"normalize", "pack", "train", "consolidate", "evaluate"}
    assert dict(row for row in packages[1:])["torch"] == prov["packages"]["torch"]

    # the first page: the headline figures
    desc = embedded(page, "workflow_desc")
    headline = yaml.safe_load((finished / "results/report/summary.yaml").read_text())
    tuned = metrics["tuned/demo_words/exact_match"]
    assert f"{metrics['base/demo_words/exact_match']:.4f} → {tuned:.4f}" in headline["demo_words/exact_match"]
    assert headline["validation loss"] == f"{final:.4g} at step {step}"
    assert headline["contamination"].startswith("none found (2 task(s) checked against ")
    for label, text in headline.items():
        assert f"<strong>{label}</strong>: {text}" in desc


def test_normalize_section_has_a_column_per_drop_reason(tmp_path):
    """Two sources with bad records, normalized with on_error=skip: each reason gets a column,
    each source its counts, and the split its total (the smoke run drops nothing)."""
    from ftflow import runner
    from ftflow.report import normalize_table, page

    bad = Path(__file__).parent / "bad_inputs"
    for name, files in (("a", ["truncated_json.jsonl", "missing_fields.jsonl"]), ("b", ["wrong_types.jsonl"])):
        (tmp_path / "data/raw" / name).mkdir(parents=True)
        for f in files:
            shutil.copy(bad / f, tmp_path / "data/raw" / name)
    sources = [{"name": n, "path": "unused", "reader": "alpaca"} for n in ("a", "b")]
    stats = runner.run(
        "normalize", {"data": {"kind": "conversation", "sources": sources, "on_error": "skip"}}, tmp_path
    )
    (table,) = Tables(page("normalize", [normalize_table(stats)])).tables
    rows = {r["source"]: r for r in records(table)}
    assert table[0] == [
        "split",
        "source",
        "reader",
        "read",
        "kept",
        "dropped",
        "bad_field",
        "invalid_json",
        "missing_field",
    ]
    for name, src in stats["splits"]["train"]["sources"].items():
        row = rows[name]
        assert (row["read"], row["kept"], row["dropped"]) == (str(src["records_in"]), str(src["records_out"]),
                                                              str(sum(src["dropped"].values())))  # fmt: skip
        assert {r: int(row[r]) for r in ("bad_field", "invalid_json", "missing_field")} == {
            r: src["dropped"].get(r, 0) for r in ("bad_field", "invalid_json", "missing_field")
        }
    assert (rows["a"]["invalid_json"], rows["a"]["missing_field"], rows["b"]["bad_field"]) == ("1", "1", "1")
    total = rows["(all)"]
    assert (total["read"], total["dropped"]) == (str(stats["splits"]["train"]["records_in"]), "3")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    html, _ = report
    shown = browser.dom(html)  # after the report's scripts ran
    assert "<title>Snakemake Report</title>" in shown
    assert ">ftflow run</h1>" in shown and "Headline figures" in shown and "1. Data" in shown
    png = browser.screenshot(html, tmp_path / "report.png")
    image = Image.open(png).convert("RGB")
    assert image.size == browser.WINDOW
    assert len(image.getcolors(maxcolors=1 << 20)) > 50  # not blank: text, the DAG's colours
    # text is drawn in the menu (its left 280 pixels) and in the content pane: many dark pixels
    menu, pane = (image.crop(box).convert("L") for box in ((0, 0, 280, 400), (285, 0, 800, image.size[1])))
    assert sum(menu.histogram()[:100]) > 500 and sum(pane.histogram()[:100]) > 2000


# --- progress ---------------------------------------------------------------------------------

PROGRESS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ftflow\.progress INFO (.*)$", re.M)


# "[desc: ]n[/total] unit[ (p%)], rate, elapsed mm:ss[, ETA mm:ss][, postfix]"
LINE = re.compile(
    r"(.+?: )?[\d.]+\w?(/[\d.]+\w?)? \w+( \(\d+%\))?, [\d.?]+\w*(/s|s/\w+), "
    r"elapsed \d\d:\d\d(, ETA \d\d:\d\d)?(, .*)?"
)
BAR = re.compile(r"\d+%\|")  # tqdm's drawn bar: " 45%|████▌     | 450/1000 [...]"


def test_every_log_of_the_run_has_no_bar(finished):
    """The whole smoke run under Snakemake (stderr: the rules' log files): no carriage returns
    and no drawn bar, in any stage's log; its bars (the Trainer's, lm-eval's, datasets', ftflow's
    own) all end within seconds, shorter than the interval (30 s), so they log nothing."""
    logs = {p.relative_to(finished / "logs").as_posix(): p.read_text() for p in (finished / "logs").rglob("*.log")}
    assert {"normalize.log", "pack.log", "train.log", "evaluate.log", "report.log"} <= set(logs)
    for name, text in logs.items():
        assert "\r" not in text and not BAR.search(text), name
        assert not PROGRESS.search(text), name


def test_a_stage_without_a_terminal_logs_progress_at_a_bounded_rate(finished, tmp_path):
    """`ftflow train` with its output in a file (as under Slurm): the Trainer's progress comes
    as whole lines with rate and ETA, at most one per interval, then a last one at the end."""
    interval, steps = 1.0, 200  # several seconds of training on 2 cores
    root = shutil.copytree(finished, tmp_path / "repo", symlinks=True)  # the finished run stays as it was
    log = tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "ftflow.cli", "train", "experiment=smoke", f"train.max_steps={steps}",
                               "tracking=none", "train.logging_steps=50"], cwd=root, stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, "FTFLOW_PROGRESS_INTERVAL": str(interval)},
                              timeout=600)  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and not BAR.search(text)
    progress = [(m[1], m[2]) for m in PROGRESS.finditer(text)]
    # every line, whichever bar (a slow machine may take over a second to load or save the model)
    for _, line in progress:
        assert LINE.fullmatch(line), line
    bar = [(t, line) for t, line in progress if re.match(rf"\d+/{steps} it ", line)]  # the Trainer's
    assert len(bar) >= 3, text[-3000:]
    for _, line in bar:
        assert re.fullmatch(rf"\d+/{steps} it \(\d+%\), [\d.]+(it/s|s/it), elapsed \d\d:\d\d, ETA \d\d:\d\d", line), (
            line
        )
    assert bar[-1][1].startswith(f"{steps}/{steps} it (100%)")
    from datetime import datetime

    times = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t, _ in bar]
    gaps = [b - a for a, b in zip(times, times[1:-1])]  # the last line comes when the bar closes
    assert all(g >= interval - 0.05 for g in gaps), gaps
    assert len(bar) <= (times[-1] - times[0]) / interval + 2


def test_on_a_terminal_progress_is_a_bar(tmp_path):
    """The same setup on a terminal keeps tqdm's bar (redrawn in place), and logs no lines."""
    code = ("import time\nfrom ftflow.cli import setup_logging\nsetup_logging()\nfrom tqdm import tqdm\n"
            "for _ in tqdm(range(20), desc='work'):\n    time.sleep(0.02)\n")  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child, on the terminal: 100 columns (a new one has 0, and tqdm would draw nothing)
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode()
    assert "\r" in text and "work: 100%|" in text and "█" in text
    assert "ftflow.progress" not in text
