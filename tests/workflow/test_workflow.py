"""The whole DAG through Snakemake on shrunken settings (experiment=smoke), and what reruns
after each kind of change, read from the jobs Snakemake plans."""

from __future__ import annotations

import json
import os

import pytest

from helpers import BIN, ftflow, planned_jobs, run, snakemake

AFTER_TRAIN = {"train": 1, "consolidate": 1, "evaluate": 1, "report": 1, "all": 1}


def test_dag_runs_to_metrics_for_base_and_tuned(finished):
    metrics = json.loads((finished / "results/eval/metrics.json").read_text())
    scores = (
        "demo_words/exact_match",
        "demo_words_choice/acc",
        "demo_words_choice/acc_norm",
    )  # generative, multiple choice
    assert set(metrics) == {f"{m}/{s}" for m in ("base", "tuned", "delta") for s in scores}
    for stage in ("normalize", "pack", "train", "consolidate", "eval"):  # each wrote its config
        assert (finished / "results" / stage / "config.yaml").exists()
    samples = (finished / "results/eval/tuned/samples.jsonl").read_text().splitlines()
    assert len(samples) == 16  # eval.limit of the smoke experiment, for each of the two tasks
    assert "| demo_words_choice/acc |" in (finished / "results/eval/comparison.md").read_text()
    card = (finished / "results/eval/model_card.md").read_text()
    assert "verified: max |log p|" in card and "## Evaluation" in card and "| demo_words/exact_match |" in card
    assert json.loads((finished / "data/manifest.json").read_text())["sources"]["demo_train"]["files"]
    # the training process computes on every core it got, not on the one thread Snakemake's
    # environment gives a rule (MKL_NUM_THREADS=1 would win over OMP_NUM_THREADS)
    assert f"process 0: {len(os.sched_getaffinity(0))} torch threads" in (finished / "logs/train.log").read_text()


def test_second_run_has_nothing_to_do(finished):
    assert planned_jobs(finished) == {}
    assert "Nothing to be done" in snakemake(cwd=finished).stdout + snakemake(cwd=finished).stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["eval.max_gen_toks=8"], {"evaluate": 1, "report": 1, "all": 1}),
        (["train.learning_rate=5e-4"], AFTER_TRAIN),
        (["peft=lora"], {**AFTER_TRAIN}),
        (["data.sources.0.limit=100"], {"normalize": 1, "pack": 1, **AFTER_TRAIN}),
        (["pack.max_length=256"], {"pack": 1, **AFTER_TRAIN}),
        (["model.trust_remote_code=true"], {"pack": 1, **AFTER_TRAIN}),
        # another model: downloaded, but normalize never reads the model
        (
            ["model=smollm2", "tokenizer=model", "template=model"],
            {"download_model": 1, "download": 1, "pack": 1, **AFTER_TRAIN},
        ),  # fmt: skip
        (["tokenizer.vocab_size=600"], {"pack": 1, **AFTER_TRAIN}),
        (["template=llama3"], {"pack": 1, **AFTER_TRAIN}),
        (["launcher.collective_timeout_s=300"], AFTER_TRAIN),
        (["tracking=none"], {}),  # the weights are the same whichever tracker watched
        (["consolidate.verify_tolerance=0.01"], {"consolidate": 1, "evaluate": 1, "report": 1, "all": 1}),
        (["slurm.jobs.train.runtime=100"], {}),  # the Slurm job's size: no stage reads it
    ],
)
def test_a_config_change_reruns_exactly_the_stages_that_read_it(finished, overrides, expected):
    try:
        ftflow("compose", "experiment=smoke", *overrides, cwd=finished)
        assert planned_jobs(finished) == expected
    finally:
        ftflow("compose", "experiment=smoke", cwd=finished)
    assert planned_jobs(finished) == {}  # back to the finished config: nothing to do again


@pytest.mark.slow
def test_a_run_names_the_keys_that_changed_for_each_stage(finished):
    try:
        out = ftflow("run", "experiment=smoke", "train.learning_rate=5e-4", "data.sources.0.limit=100", "--", "-n",
                     cwd=finished).stderr  # fmt: skip
        lines = [line for line in out.splitlines() if line.startswith("changed since the results on disk: ")]
        assert lines == [
            "changed since the results on disk: normalize: data.sources[0].limit: 200 -> 100",
            "changed since the results on disk: train: train.learning_rate: 0.001 -> 0.0005",
        ], out[-3000:]
    finally:
        ftflow("compose", "experiment=smoke", cwd=finished)


@pytest.mark.slow
def test_results_made_by_another_config_are_never_presented(finished):
    """Whatever Snakemake decides: the report stage and `ftflow chat` refuse results whose
    recorded config is not the current one, naming the stage and the keys."""
    config = finished / "results/consolidate/config.yaml"
    original = config.read_text()
    try:
        config.write_text(original.replace("verify_tolerance: null", "verify_tolerance: 0.5"))
        chat = ftflow("chat", "--prompt", "hi", cwd=finished, check=False)
        assert chat.returncode == 1, chat.stderr
        assert "consolidate: consolidate.verify_tolerance: 0.5 -> null" in chat.stderr
        report = ftflow("report", "--", "--forcerun", "report", cwd=finished, check=False)
        assert report.returncode != 0 and "consolidate.verify_tolerance: 0.5 -> null" in report.stderr + report.stdout
    finally:
        config.write_text(original)
        ftflow("report", cwd=finished)  # the failed report job's files were removed: make them again
    assert planned_jobs(finished) == {}


@pytest.mark.slow
def test_a_changed_source_is_downloaded_alone(finished):
    """Each source is its own download job: the other source is neither copied nor re-read.
    (Snakemake compares small inputs by checksum, so the file must change, not just its time.)"""
    src = finished / "examples/demo/test.jsonl"
    original, before = src.read_bytes(), src.stat()
    try:
        src.write_bytes(original + b"\n")
        jobs = planned_jobs(finished)
        assert (jobs["download_source"], jobs["download"], jobs["normalize"]) == (1, 1, 1)
    finally:
        src.write_bytes(original)
        os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert planned_jobs(finished) == {}


@pytest.mark.slow
def test_editing_pack_code_reruns_pack_and_everything_after(finished):
    code = finished / "src/ftflow/pack/stage.py"
    original = code.read_text()
    try:
        code.write_text(original + "\n# an edit\n")
        assert planned_jobs(finished) == {"pack": 1, **AFTER_TRAIN}
    finally:
        code.write_text(original)


def test_stale_params_are_refused(finished):
    conf = finished / "conf/eval/demo.yaml"
    original = conf.read_text()
    try:
        conf.write_text(original.replace("num_fewshot: 0", "num_fewshot: 1"))
        proc = snakemake("--dry-run", cwd=finished, check=False)
        assert proc.returncode != 0
        assert "stale params.yaml" in proc.stdout + proc.stderr and "eval.num_fewshot" in proc.stdout + proc.stderr
    finally:
        conf.write_text(original)


def test_code_is_formatted_and_lint_clean():
    """`make lint`'s checks on the repository itself (config in pyproject.toml): ruff's pyflakes
    and import order, its formatter, and snakefmt on the rules."""
    from helpers import REPO

    for cmd in (
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["snakefmt", "--check", "rules", "workflow"],
    ):
        run([str(BIN / cmd[0]), *cmd[1:]], REPO)


def test_lint_is_clean(repo):
    ftflow("compose", cwd=repo)
    out = snakemake("--lint", cwd=repo)
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


HEAVY = ("torch", "transformers", "pyarrow", "datasets")


def import_chain(importtime: str, module: str) -> list[str] | None:
    """The modules through which `module` was first imported, outermost first, read from
    `python -X importtime` output (an import's line follows those of its own imports, which are
    indented one level deeper); None if it was not imported."""
    rows = [line.split("|")[-1] for line in importtime.splitlines() if line.startswith("import time:")]
    rows = [(len(r) - len(r.lstrip()), r.strip()) for r in rows[1:]]  # the first row is the header
    for k, (depth, name) in enumerate(rows):
        if name == module:
            chain = [name]
            for d, parent in rows[k + 1 :]:
                if d < depth:
                    chain.append(parent)
                    depth = d
            return chain[::-1]
    return None


# what the Snakefile's parse may import of ftflow: the params check, the paths, the rules' input
# files, the Slurm resources and the dvc.yaml check; no stage
PARSE_MODULES = {"ftflow", "ftflow.config", "ftflow.config.locations", "ftflow.config.params",
                 "ftflow.errors", "ftflow.paths", "ftflow.stages",
                 "ftflow.workflow", "ftflow.workflow.inputs", "ftflow.workflow.slurm", "ftflow.workflow.dvcyaml",
                 "ftflow.workflow.workspace"}  # fmt: skip


def imported(importtime: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


def test_parsing_the_workflow_loads_no_stage_implementation(repo):
    """Every `snakemake -n`, `ftflow dispatch` and Slurm job step parses the Snakefile: it may
    import no stage module of ftflow, and nothing ftflow imports for it may load torch,
    transformers, pyarrow or datasets (Snakemake's Slurm plugin imports pandas, which imports
    pyarrow: that chain is Snakemake's own). The first parse composes conf/ (Hydra) to check
    params.yaml against the schema; the next ones reuse that check, the schema's classes unbuilt."""
    ftflow("compose", cwd=repo)
    for parse in ("first", "next"):
        out = run(
            [str(BIN / "snakemake"), "--dry-run", "--cores", "1"], repo, env_extra={"PYTHONPROFILEIMPORTTIME": "1"}
        )
        assert "This was a dry-run" in out.stdout
        chains = {module: import_chain(out.stderr, module) for module in HEAVY}
        assert chains["torch"] is None and chains["transformers"] is None and chains["datasets"] is None, chains
        assert not any(name.startswith("ftflow") for chain in chains.values() if chain for name in chain), chains
        ours = {m for m in imported(out.stderr) if m.split(".")[0] == "ftflow"}
        # the first check validates (the schema), and asks the readers and rewards about those conf/ names
        checked = (
            {
                "ftflow.config.schema",
                "ftflow.data",
                "ftflow.data.readers",
                "ftflow.data.messages",
                "ftflow.train",
                "ftflow.train.rewards",
            }
            if parse == "first"
            else set()
        )
        assert ours == PARSE_MODULES | checked, (parse, ours)  # ==: the test reads the parse it means to
        assert ("hydra" in imported(out.stderr)) == (parse == "first"), parse
