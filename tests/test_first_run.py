"""A user's first own run, typed as the README says, on a fresh copy of the repository: their own
30 conversations and a 3-step run that ends with a report; a wrong model path and an empty model
folder refused before anything runs; a misspelt key with a "did you mean"; Ctrl-C while training
(a checkpoint, one line, no traceback) and the rerun that resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import BIN, copy_repo, env, ftflow, job_stats

MINE = ["data=mine", "tracking=none"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("first") / "repo")
    (root / "mydata").mkdir()
    fruit = ["apple", "pear", "plum", "fig", "kiwi", "lime"]
    with (root / "mydata" / "chats.jsonl").open("w") as f:
        for i in range(30):
            a, b = fruit[i % 6], fruit[(i * 5 + 1) % 6]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Which fruit comes first: {a} or {b}? ({i})"},
                {"role": "assistant", "content": min(a, b)}]}) + "\n")  # fmt: skip
    (root / "conf" / "data" / "mine.yaml").write_text(
        "kind: conversation\nsources:\n  - name: mine\n    path: mydata/chats.jsonl\n    reader: messages\n"
    )
    return root


def no_traceback(root: Path, *outputs: str) -> None:
    for log in (root / "logs").rglob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), f"{log}:\n{log.read_text()[-3000:]}"
    for out in outputs:
        assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_a_short_run_on_the_users_own_data_ends_with_a_report(repo):
    proc = ftflow("run", *MINE, "train.max_steps=3", cwd=repo)
    assert {"normalize", "pack", "train", "consolidate", "evaluate", "report"} <= job_stats(proc.stderr).keys()
    summary = (repo / "results/report/summary.yaml").read_text()
    assert "train records kept: 30 of 30" in summary
    # no test split: no evaluation, said before the run and in the report (not the demo's tasks on this data)
    assert (
        "eval: the default eval=demo scores examples/demo/test.jsonl, which is not your data; not evaluating"
        in proc.stderr
    )
    assert "evaluation: none (eval=none)" in summary
    assert "training loss: " in summary and "(logged at step 3 of 3)" in summary, summary
    assert (repo / "results/report.html").exists()


@pytest.mark.slow
def test_a_wrong_model_path_or_an_empty_folder_is_refused_before_anything_runs(repo, tmp_path):
    report = repo / "results/report.html"
    before = (report.stat().st_mtime_ns, (repo / "params.yaml").read_text())
    (tmp_path / "empty").mkdir()
    for path, why in (("/nonexistent/model", "/nonexistent/model does not exist"),
                      (str(tmp_path / "empty"), f"{tmp_path / 'empty'} is not an HF model directory: it lacks config.json")):  # fmt: skip
        proc = ftflow("run", *MINE, "model=local", f"model.path={path}", "tokenizer=model", "template=model",
                      cwd=repo, check=False)  # fmt: skip
        assert proc.returncode == 2 and f"model.path: {why}" in proc.stderr, proc.stderr
        assert "Nothing to be done" not in proc.stderr and "Traceback" not in proc.stderr
    # the results and the config that made them are left as they were: nothing new claims them
    assert (report.stat().st_mtime_ns, (repo / "params.yaml").read_text()) == before


@pytest.mark.slow
def test_a_misspelt_key_gets_did_you_mean(repo):
    for key in ("train.learnig_rate=1e-4", "+train.learnig_rate=1e-4"):
        proc = ftflow("run", *MINE, key, cwd=repo, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "train.learnig_rate: unknown key — did you mean train.learning_rate?" in proc.stderr
        assert "To append to your config" not in proc.stderr


def started_training(log: Path) -> bool:
    return log.exists() and "{'loss'" in log.read_text(errors="replace")


@pytest.mark.slow
def test_ctrl_c_while_training_saves_a_checkpoint_and_the_rerun_resumes(repo):
    run = ["run", *MINE, "train.max_steps=150", "train.logging_steps=50"]
    log = repo / "logs/train.log"
    log.unlink(missing_ok=True)
    # as a terminal's Ctrl-C: SIGINT to every process of the foreground process group
    proc = subprocess.Popen([str(BIN / "ftflow"), *run], cwd=repo, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not started_training(log) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before training started"
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    interrupted = [line for line in err.splitlines() if line.startswith("ftflow run: interrupted")]
    assert len(interrupted) == 1 and "goes on from where it stopped" in interrupted[0], err[-3000:]
    stopped = [line for line in log.read_text().splitlines() if "training stopped on SIGINT at step" in line]
    assert len(stopped) == 1, log.read_text()[-3000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert 0 < step < 150
    no_traceback(repo, out, err)

    rerun = ftflow(*run, cwd=repo)
    assert job_stats(rerun.stderr).keys() >= {"train", "consolidate", "evaluate", "report"}
    assert "Resuming from results/train/checkpoints/" in log.read_text() and f"checkpoint-{step}" in log.read_text()
    summary = json.loads((repo / "results/train/summary.json").read_text())
    assert summary["resumed_from"] == f"checkpoint-{step}" and summary["steps"] == 150
    no_traceback(repo, rerun.stdout, rerun.stderr)

    # train.resume=false: the same config trains afresh from step 0 (a finished run changes no
    # result for it, so the README says to force the stage)
    fresh = ftflow(*run, "train.resume=false", "--", "--forcerun", "train", cwd=repo)
    assert "train.resume=false: removing" in log.read_text() and "Resuming" not in log.read_text()
    assert json.loads((repo / "results/train/summary.json").read_text())["resumed_from"] is None
    assert "train" in job_stats(fresh.stderr)


def test_the_ctrl_c_hint_never_repeats_train_resume_false():
    """Rerunning an interrupted `... train.resume=false` as it was would remove the checkpoint it
    just saved: the hint leaves that override out and says why."""
    from ftflow.cli import how_to_go_on

    hint = how_to_go_on(["run", "data=mine", "train.max_steps=150", "train.resume=false"])
    assert hint.startswith("`ftflow run data=mine train.max_steps=150` goes on from where it stopped")
    assert "with train.resume=false it would start afresh and remove that checkpoint" in hint
    assert how_to_go_on(["run", "data=mine"]).startswith("`ftflow run data=mine` goes on from where it stopped")


@pytest.mark.slow
def test_splits_carved_from_the_users_data_and_the_holdout_evaluation(repo):
    """data.validation_size/test_size carve the splits; eval=holdout answers the test split with
    both models and scores it; normalize again gives the same files."""
    from ftflow.holdout import METRICS

    carve = ["data.validation_size=0.1", "data.test_size=0.1"]
    ftflow("run", *MINE, *carve, "eval=holdout", "train.max_steps=3", cwd=repo)
    stats = json.loads((repo / "results/normalize/stats.json").read_text())["splits"]
    rows = {split: stats[split]["rows"] for split in ("train", "validation", "test")}
    assert sum(rows.values()) == 30 and rows["test"] > 0 and rows["validation"] > 0, rows
    metrics = json.loads((repo / "results/eval/metrics.json").read_text())
    assert {f"{label}/holdout/{m}" for label in ("base", "tuned", "delta") for m in METRICS} == set(metrics)
    for label in ("base", "tuned"):
        lines = [json.loads(line) for line in (repo / f"results/eval/{label}/holdout.jsonl").read_text().splitlines()]
        assert len(lines) == rows["test"] and all(line["reference"] in ("apple", "fig", "kiwi", "lime", "pear", "plum")
                                                  and "answer" in line for line in lines)  # fmt: skip
    summary = (repo / "results/report/summary.yaml").read_text()
    assert f"test records: {rows['test']} records carved from train (data.test_size=0.1" in summary
    assert "holdout/loss: " in summary

    ftflow("normalize", *MINE, *carve, cwd=repo)
    again = json.loads((repo / "results/normalize/stats.json").read_text())["splits"]
    assert {s: again[s]["sha256"] for s in rows} == {s: stats[s]["sha256"] for s in rows}
