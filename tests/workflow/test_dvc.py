"""DVC as a front door to the Snakemake DAG, with real `dvc` and `snakemake` in a temporary git
repository: dvc.yaml against the DAG, repro, rerun minimality, experiments (workspace and
queued), plots, checkpoints that survive DVC, and a fresh clone restored with `dvc pull`.

The repository runs the smoke experiment (set as the conf/ default in the copy, so that every
`dvc exp run` composes it), a few seconds per stage.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import BIN, REPO, copy_repo, env, ftflow, job_stats, planned_jobs, run, snakemake

# what a DVC-enabled checkout has besides the workflow itself
DVC_PARTS = (".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore", "dvc.yaml", "params.yaml", "hydra_plugins")


def dvc(*args: str, cwd: Path, check: bool = True):
    return run([str(BIN / "dvc"), *args], cwd, check)


def git(*args: str, cwd: Path):
    return run(["git", "-c", "user.name=ftflow", "-c", "user.email=ftflow@localhost", *args], cwd)


def stages_run(proc) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` actually ran, from its own report."""
    return re.findall(r"Running stage '([\w-]+)'", proc.stdout + proc.stderr)


def restore(root: Path) -> None:
    """Back to the committed state: config and lock from git, outputs from DVC's cache."""
    git("checkout", "HEAD", "--", "params.yaml", "dvc.lock", cwd=root)
    dvc("checkout", cwd=root)
    ftflow("sync", cwd=root)
    assert planned_jobs(root) == {}


def make_dvc_repo(root: Path) -> Path:
    copy_repo(root)
    for part in DVC_PARTS:
        src, dest = REPO / part, root / part
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest) if src.is_dir() else shutil.copy(src, dest)
    # the smoke experiment as the default, so DVC's own composition (dvc exp run) picks it too
    conf = root / "conf/config.yaml"
    conf.write_text(conf.read_text().replace("  - experiment: null", "  - experiment: smoke"))
    git("init", "-q", "-b", "main", cwd=root)
    ftflow("compose", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "workflow", cwd=root)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC repository whose data is downloaded and `dvc add`ed, and reproduced by DVC."""
    root = make_dvc_repo(tmp_path_factory.mktemp("dvc") / "repo")
    snakemake("download", cwd=root)
    dvc("add", "data", cwd=root)
    # data.dvc in the repository pins the data as downloaded: a fresh download hashes the same
    tracked = [yaml.safe_load((r / "data.dvc").read_text())["outs"][0]["md5"] for r in (root, REPO)]
    assert tracked[0] == tracked[1]
    git("add", "-A", cwd=root)
    git("commit", "-qm", "data", cwd=root)
    proc = dvc("repro", cwd=root)
    assert stages_run(proc) == ["compose", "normalize", "pack", "train", "consolidate", "evaluate", "report"]
    git("add", "-A", cwd=root)
    git("commit", "-qm", "reproduced", cwd=root)
    return root


# --- 1. dvc.yaml and the Snakemake DAG cannot drift ----------------------------------------


def dvc_stage_graph(root: Path) -> dict:
    """The stage graph as DVC itself parses dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {
            stage.name: {
                "cmd": stage.cmd,
                "deps": sorted(d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)),
                "params": sorted(p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params),
                "outs": sorted(o.def_path for o in stage.outs),
                "persist": sorted(o.def_path for o in stage.outs if o.persist),
            }
            for stage in repo.index.stages
            if stage.name
        }


def snakemake_stage_graph(root: Path) -> dict:
    """The stage graph of the rules, as Snakemake parses them for the current params.yaml."""
    from ftflow.workflow import dvcyaml

    return dvcyaml.rule_graph(dvcyaml.snakemake_rules(root), root)


def compare(root: Path) -> list[str]:
    from ftflow import stages
    from ftflow.workflow import dvcyaml

    declared, rules = dvc_stage_graph(root), snakemake_stage_graph(root)
    problems = dvcyaml.differences(rules, {k: v for k, v in declared.items() if k != "compose"})
    for name in stages.DVC_STAGES:
        if name in declared:
            if declared[name]["cmd"] != f"ftflow dispatch {name}":
                problems.append(f"{name}: cmd {declared[name]['cmd']!r} does not dispatch its own rule")
            stage = stages.BY_NAME[name]  # its sections, but those it reads as it starts (they rerun nothing)
            if declared[name]["params"] != sorted(set(stage.sections) - set(stage.read_at_run)):
                problems.append(f"{name}: params {declared[name]['params']} != its sections")
    return problems


@pytest.mark.dvc
def test_dvc_yaml_is_the_snakemake_dag(tmp_path):
    root = make_dvc_repo(tmp_path / "repo")
    assert compare(root) == []
    graph = dvc_stage_graph(root)
    assert graph["train"]["persist"] == ["results/train/checkpoints"]
    assert "compose" in graph and graph["compose"]["deps"] == ["conf"]
    # the committed file is exactly what the rules render to
    from ftflow.workflow import dvcyaml

    assert (REPO / "dvc.yaml").read_text() == dvcyaml.dump(dvcyaml.render(snakemake_stage_graph(root)))


@pytest.mark.dvc
def test_the_comparison_fails_on_a_rule_edit(tmp_path):
    root = make_dvc_repo(tmp_path / "repo")
    rule = root / "rules/consolidate.smk"
    rule.write_text(
        rule.read_text().replace(
            'summary=f"{paths.CONSOLIDATE}/summary.json",',
            'summary=f"{paths.CONSOLIDATE}/summary.json",\n        card=f"{paths.CONSOLIDATE}/card.md",',
        )
    )
    assert compare(root) == ["consolidate.outs: in the Snakemake rule only: ['results/consolidate/card.md']"]
    # and a stage run by DVC refuses to run on a drifted dvc.yaml
    proc = ftflow("dispatch", "consolidate", cwd=root, check=False)
    assert proc.returncode != 0 and "does not match the Snakemake DAG" in proc.stdout + proc.stderr


@pytest.mark.dvc
def test_dispatch_runs_one_rule_with_the_profile_in_snakemake_profile(tmp_path):
    """`SNAKEMAKE_PROFILE=profiles/slurm dvc repro`: the stage command takes its profile from
    the environment (here a profile that only plans, to see which profile and jobs it used)."""
    root = make_dvc_repo(tmp_path / "repo")
    profile = tmp_path / "planning"
    profile.mkdir()
    (profile / "config.v8+.yaml").write_text("cores: 1\ndry-run: true\n")
    snakemake("download", cwd=root)  # normalize's inputs
    proc = run([str(BIN / "ftflow"), "dispatch", "normalize"], root, env_extra={"SNAKEMAKE_PROFILE": str(profile)})
    out = proc.stdout + proc.stderr
    assert f"Using profile {profile}" in out
    assert job_stats(out) == {"normalize": 1}  # that rule alone
    # an upstream rule that looks out of date to Snakemake does not run either: DVC judged it
    # (after DVC relinks an output to an older cached copy, Snakemake sees such dates)
    code = root / "src/ftflow/data/download.py"
    code.write_text(code.read_text() + "\n# an edit\n")
    assert planned_jobs(root)["download"] == 1
    proc = run([str(BIN / "ftflow"), "dispatch", "normalize"], root, env_extra={"SNAKEMAKE_PROFILE": str(profile)})
    assert job_stats(proc.stdout + proc.stderr) == {"normalize": 1}
    # an upstream output missing is an error, never a reason to run another rule
    proc = run([str(BIN / "ftflow"), "dispatch", "pack"], root, check=False)
    assert proc.returncode != 0 and "MissingInputException" in proc.stdout + proc.stderr


# --- 2. dvc repro, dvc status, snakemake -n agree ------------------------------------------


@pytest.mark.dvc
@pytest.mark.slow
def test_after_repro_dvc_and_snakemake_have_nothing_to_do(project):
    assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout
    assert planned_jobs(project) == {}
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"compose", "normalize", "pack", "train", "consolidate", "evaluate", "report"}
    assert any(o["path"] == "results/train/checkpoints" for o in lock["stages"]["train"]["outs"])
    metrics = json.loads((project / "results/eval/metrics.json").read_text())
    assert "tuned/demo_words/exact_match" in metrics


# --- 3. rerun minimality, by the stages dvc repro runs ------------------------------------


def report_inputs(root: Path) -> dict[str, str]:
    """sha256 of every file the report stage depends on (dvc.yaml's deps of `report`)."""
    deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["report"]["deps"]
    files = [f for d in deps for f in ([root / d] if (root / d).is_file() else sorted((root / d).rglob("*")))]
    return {str(f): digest(f) for f in files if f.is_file() and f.name != ".snakemake_timestamp"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], []),
        (["eval.max_gen_toks=8"], ["evaluate"]),
        # (a train setting: the experiments below, and peft=lora in test_workflow's Snakemake plans)
        (["data.sources.0.limit=150"], ["normalize", "pack", "train", "consolidate", "evaluate"]),
    ],
    ids=["nothing", "eval", "normalize"],
)
@pytest.mark.dvc
def test_dvc_repro_reruns_exactly_the_changed_stages(project, overrides, expected):
    try:
        ftflow("compose", *overrides, cwd=project)
        before = report_inputs(project)
        ran = stages_run(dvc("repro", cwd=project))
        # report reads no config: it reruns when what it reads changed (an eval setting may leave
        # the scores as they were)
        assert ran == expected + (["report"] if report_inputs(project) != before else [])
        # DVC relinked the outputs (an unchanged file takes its cached copy's time): after
        # `ftflow sync`, Snakemake agrees
        ftflow("sync", cwd=project)
        assert planned_jobs(project) == {}
    finally:
        restore(project)


@pytest.mark.dvc
@pytest.mark.slow
def test_a_run_is_recorded_by_dvc_commit(project):
    """`ftflow run` records its run in dvc.lock itself, keeping the times Snakemake compares; a
    plain `snakemake` run is recorded by `dvc commit dvc.yaml`."""
    try:
        proc = ftflow("run", "eval.max_gen_toks=4", cwd=project)
        assert "dvc: the run recorded in dvc.lock" in proc.stderr
        assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout
        assert planned_jobs(project) == {}
        ftflow("compose", "eval.max_gen_toks=5", cwd=project)
        snakemake(cwd=project)
        assert "evaluate" in dvc("status", cwd=project).stdout
        dvc("commit", "--force", "dvc.yaml", cwd=project)
        assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout
    finally:
        restore(project)


@pytest.mark.dvc
@pytest.mark.slow
def test_a_stale_composed_config_is_refused(project):
    conf = project / "conf/eval/demo.yaml"
    original = conf.read_text()
    try:
        conf.write_text(original.replace("num_fewshot: 0", "num_fewshot: 1"))
        proc = dvc("repro", cwd=project, check=False)  # composed by `ftflow compose`: overrides recorded
        assert proc.returncode != 0 and "stale params.yaml" in proc.stdout + proc.stderr
        assert "eval.num_fewshot" in proc.stdout + proc.stderr
    finally:
        conf.write_text(original)
    assert stages_run(dvc("repro", cwd=project)) == []  # conf/ is back as dvc.lock has it


# --- checkpoints: versioned, survive DVC's deletion of outputs, keyed by config -----------


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.dvc
@pytest.mark.slow
def test_checkpoints_survive_dvc_and_only_the_same_config_resumes(project):
    weights = project / "results/train/model/model.safetensors"
    before = digest(weights)
    proc = dvc("repro", "--force", "--single-item", "train", cwd=project)
    assert stages_run(proc) == ["train"]
    summary = json.loads((project / "results/train/summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-4"  # DVC deleted the outputs, not the checkpoints
    assert digest(weights) == before
    assert [p.name for p in (project / "results/train/checkpoints").iterdir()] == [summary["config_fingerprint"]]
    assert_cache_intact(project)  # the resumed trainer wrote no file through a link into the cache


def assert_cache_intact(root: Path) -> None:
    """Every file object in DVC's cache still has the md5 it is filed under."""
    objects = [p for p in (root / ".dvc/cache/files/md5").rglob("*") if p.is_file() and not p.name.endswith(".dir")]
    assert objects
    for obj in objects:
        assert hashlib.md5(obj.read_bytes()).hexdigest() == obj.parent.name + obj.name, obj


# --- 4. experiments, in the workspace and queued; exp show; plots diff --------------------


def exp_rows(root: Path) -> dict[str, dict]:
    """{experiment name: {"lr": ..., "tuned": ..., "final_loss": ...}} from `dvc exp show --json`."""
    rows = {}
    for baseline in json.loads(dvc("exp", "show", "--json", cwd=root).stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                metrics = {k: v for f in data["metrics"].values() for k, v in f["data"].items()}
                rows[rev["name"]] = {
                    "lr": data["params"]["params.yaml"]["data"]["train"]["learning_rate"],
                    "tuned": metrics.get("tuned/demo_words/exact_match"),
                    "final_loss": metrics.get("final_loss"),
                }
    return rows


@pytest.mark.dvc
@pytest.mark.slow
def test_experiments_in_the_workspace_and_queued(project):
    proc = dvc("exp", "run", "-n", "lr-a", "-S", "train.learning_rate=5e-4", cwd=project)
    assert stages_run(proc) == ["train", "consolidate", "evaluate", "report"]
    dvc("exp", "run", "--queue", "-n", "lr-b", "-S", "train.learning_rate=2e-3", cwd=project)
    dvc("queue", "start", "-j", "1", cwd=project)
    status = ""
    for _ in range(120):  # a worker runs it in a temporary copy of the repository
        status = dvc("queue", "status", cwd=project).stdout
        if "Success" in status or "Failed" in status:
            break
        time.sleep(5)
    assert "Success" in status, status + dvc("queue", "logs", "lr-b", cwd=project, check=False).stdout

    rows = exp_rows(project)
    assert {name: row["lr"] for name, row in rows.items()} == {"lr-a": 5e-4, "lr-b": 2e-3}
    for row in rows.values():  # each with its own eval and training metrics
        assert isinstance(row["tuned"], float) and isinstance(row["final_loss"], float)
    assert rows["lr-a"]["final_loss"] != rows["lr-b"]["final_loss"]

    plots = json.loads(dvc("plots", "diff", "lr-a", "lr-b", "--json", cwd=project).stdout)["data"]
    curve = plots["Loss"][0]
    assert curve["revisions"] == ["lr-a", "lr-b"]
    values = curve["content"]["data"]["values"]
    loss = sorted((v["rev"], v["split"], int(v["step"])) for v in values if v["metric"] == "loss")
    # smoke: 4 logged steps and 2 validation passes each
    assert loss == sorted([(r, "train", s) for r in ("lr-a", "lr-b") for s in (1, 2, 3, 4)] +
                          [(r, "validation", s) for r in ("lr-a", "lr-b") for s in (2, 4)])  # fmt: skip
    # ftflow's templates (.dvc/plots/): the loss on a log scale, a colour per experiment, train and
    # validation lines; the scores in a base and a tuned column, a bar per experiment for each score
    encoding = curve["content"]["encoding"]
    assert encoding["y"]["scale"]["type"] == "log" and encoding["color"]["field"] == "rev"
    assert encoding["strokeDash"]["field"] == "split"
    (bars,) = plots["Evaluation: base vs tuned"]
    assert bars["content"]["facet"]["column"]["field"] == "model"
    assert bars["content"]["spec"]["encoding"]["yOffset"]["field"] == "rev"
    scores = {(v["rev"], v["model"], v["score"]): v["value"] for v in bars["content"]["data"]["values"]}
    names = ("demo_words/exact_match", "demo_words_choice/acc", "demo_words_choice/acc_norm")
    assert set(scores) == {(r, m, n) for r in ("lr-a", "lr-b") for m in ("base", "tuned") for n in names}
    for rev in ("lr-a", "lr-b"):  # each experiment's own scores
        assert scores[(rev, "tuned", "demo_words/exact_match")] == rows[rev]["tuned"]
    html = project / "plots"
    dvc("plots", "diff", "lr-a", "lr-b", "-o", str(html), cwd=project)
    assert "Loss" in (html / "index.html").read_text()
    dvc("exp", "apply", "lr-b", cwd=project)  # the workspace takes lr-b (queued: it ran in a copy)
    ftflow("sync", cwd=project)


# --- 5. a fresh clone restored by dvc pull -------------------------------------------------


@pytest.mark.dvc
@pytest.mark.slow
def test_fresh_clone_and_pull_has_nothing_to_rerun(project):
    git("add", "-A", cwd=project)
    git("commit", "-qm", "lr-b", cwd=project)
    dvc("push", cwd=project)  # to the default remote: ../ftflow-dvc-remote, beside the repository
    assert (project.parent / "ftflow-dvc-remote").is_dir()
    clone = project.parent / "clone"
    git("clone", "-q", str(project), str(clone), cwd=project.parent)
    dvc("pull", cwd=clone)
    # DVC restored the files in its own order and Snakemake may see stale times: sync fixes that
    ftflow("sync", cwd=clone)
    assert "Data and pipelines are up to date" in dvc("status", cwd=clone).stdout
    assert planned_jobs(clone) == {}
    for path in ("data/manifest.json", "results/consolidate/model/model.safetensors", "results/eval/metrics.json"):
        assert digest(clone / path) == digest(project / path)
    assert_cache_intact(project)
    (ckpt,) = (clone / "results/train/checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(clone / "results/consolidate/model")


@pytest.mark.dvc
@pytest.mark.slow
def test_a_damaged_cache_object_is_named_by_the_stage_that_reads_it_with_the_fix(project):
    """A bit flips in the DVC cache object of a downloaded file; DVC hardlinks it into data/raw/,
    so the workspace file changes with it. DVC does not notice the damage: `dvc repro` records
    the changed data folder as a new version (data.dvc) and reruns normalize. The stage that
    reads the file, normalize, refuses it, naming the file, the damaged object, DVC's new record
    and the fix; following the fix restores the file from the remote."""
    dvc("push", cwd=project)
    raw = project / "data/raw/demo_train/train.jsonl"
    original = raw.read_bytes()
    md5 = hashlib.md5(original).hexdigest()
    obj = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    assert obj.stat().st_ino == raw.stat().st_ino  # one file, two names
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    obj.write_bytes(bytes(damaged))  # in place (as root: the object is read-only)
    proc = dvc("repro", cwd=project, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and stages_run(proc) == ["normalize"], out[-3000:]
    assert run(["git", "diff", "--quiet", "data.dvc"], project, check=False).returncode == 1  # DVC's new record
    new = hashlib.md5(damaged).hexdigest()
    new = project / ".dvc/cache/files/md5" / new[:2] / new[2:]
    assert ("data/raw/demo_train/train.jsonl is not the file download wrote (its sha256 differs): damaged on disk "
            f"or changed since. It is a link into DVC's cache, so the cached copy is damaged too ({obj}). Remove that "
            f"object; undo DVC's record of the damaged content as a new version ({new}): `git checkout` the .dvc file "
            "or dvc.lock that changed; then `dvc fetch` (from the remote) and `dvc checkout --relink --force` "
            "restore both.") in out, out[-3000:]  # fmt: skip
    # the fix, step by step
    obj.unlink()
    git("checkout", "--", "data.dvc", cwd=project)
    dvc("fetch", cwd=project)
    dvc("checkout", "--relink", "--force", cwd=project)
    assert raw.read_bytes() == original
    ftflow("sync", cwd=project)
    assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout
    assert planned_jobs(project) == {}


# --- 6. one run at a time --------------------------------------------------------------------


@pytest.mark.dvc
@pytest.mark.slow
def test_a_dvc_run_and_an_ftflow_run_refuse_each_other(project):
    """A `dvc exp run` in the workspace holds it while its stages run: `ftflow run` is refused,
    naming it. An `ftflow run` holds DVC's lock too: `dvc repro` stops at once, before it removes
    any output it would rebuild, and DVC's lock file names the run. Each first run finishes."""
    from ftflow.workflow.workspace import DVC_LOCK, LOCK

    exp = subprocess.Popen([str(BIN / "dvc"), "exp", "run", "-n", "lr-c", "-S", "train.learning_rate=3e-4"],
                           cwd=project, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 120
    while "(its stage train)" not in ((project / LOCK).read_text() if (project / LOCK).exists() else ""):
        assert exp.poll() is None and time.time() < deadline, exp.stdout.read()[-3000:]
        time.sleep(0.1)
    began = time.time()
    proc = ftflow("run", cwd=project, check=False)
    assert proc.returncode == 3 and time.time() - began < 20
    assert re.search(r"in use by `.*dvc exp run -n lr-c .*\(its stage train\)` \(pid \d+", proc.stderr), proc.stderr
    out = exp.communicate(timeout=600)[0]
    ran = re.findall(r"Running stage '([\w-]+)'", out)
    assert exp.returncode == 0 and ran == ["train", "consolidate", "evaluate", "report"], out[-3000:]

    first = subprocess.Popen([str(BIN / "ftflow"), "run", "train.learning_rate=7e-4"], cwd=project, env=env(),
                             text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    while f'"pid": {first.pid}' not in ((project / LOCK).read_text() if (project / LOCK).exists() else ""):
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.1)
    began = time.time()
    proc = dvc("repro", cwd=project, check=False)
    assert proc.returncode != 0 and "Unable to acquire lock" in proc.stderr + proc.stdout
    assert time.time() - began < 30 and not stages_run(proc)  # no stage started, no output removed
    assert "ftflow run train.learning_rate=7e-4" in (project / DVC_LOCK).read_text()
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    first.stderr.close()
    assert planned_jobs(project) == {}  # the run's outputs are whole
    # back to the committed state (--force: the run's outputs were never DVC's)
    git("checkout", "HEAD", "--", "params.yaml", "dvc.lock", cwd=project)
    dvc("checkout", "--force", cwd=project)
    ftflow("sync", cwd=project)
    assert planned_jobs(project) == {}


# --- 6. one state for both doors --------------------------------------------------------------


def checkpoints(root: Path) -> set[str]:
    folder = root / "results/train/checkpoints"
    return {str(p.relative_to(folder)) for p in folder.glob("*/checkpoint-*")} if folder.exists() else set()


@pytest.mark.dvc
@pytest.mark.slow
def test_after_any_ftflow_runs_a_dvc_experiment_reruns_only_what_its_change_reaches(tmp_path):
    """`ftflow run`s with other overrides, then DVC's door: each `dvc exp run` runs what its change
    reaches and nothing else, removes no checkpoint, and its report shows its own results; a
    source nobody downloaded fails at once naming it and the command."""
    root = make_dvc_repo(tmp_path / "repo")
    snakemake("download", cwd=root)
    dvc("add", "data", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "data", cwd=root)
    (root / "mydata").mkdir()
    (root / "mydata/chats.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}) + "\n"
        for w in ["red", "green", "blue", "plum", "fig", "sea"] * 5))  # fmt: skip
    own_data = ["data.sources.0.name=mine", "data.sources.0.path=mydata/chats.jsonl", "+data.sources.0.reader=messages"]
    # a pretrained model too: train's outputs (its init/ among them) are the same for every model
    pretrained = ["model=smollm2", "tokenizer=model", "template=model", "train.max_steps=1", "eval.limit=2"]
    for overrides in (own_data, pretrained, ["pack.max_length=96", "train.learning_rate=2e-3"], ["tracking=none"], []):
        proc = ftflow("run", *overrides, cwd=root)
        assert "dvc: the run recorded in dvc.lock" in proc.stderr, proc.stderr[-2000:]
    kept = checkpoints(root)
    assert kept

    # the last ftflow run was conf/'s own config: an eval setting reruns evaluate and report only
    proc = dvc("exp", "run", "-S", "eval.limit=10", cwd=root)
    assert stages_run(proc) == ["evaluate", "report"]
    assert "hash info" not in proc.stdout + proc.stderr
    assert kept <= checkpoints(root)
    assert yaml.safe_load((root / "results/eval/config.yaml").read_text())["eval"]["limit"] == 10

    # what the first ftflow run made is in DVC's cache: its pack comes back from there, train runs anew
    lock = (root / "dvc.lock").read_text()
    proc = dvc("exp", "run", "-S", "pack.max_length=96", "-S", "train.learning_rate=3e-3", cwd=root)
    assert "pack" not in stages_run(proc) and {"train", "consolidate", "evaluate", "report"} <= set(stages_run(proc))
    assert yaml.safe_load((root / "results/pack/config.yaml").read_text())["pack"]["max_length"] == 96  # restored
    assert "hash info" not in proc.stdout + proc.stderr
    summary = yaml.safe_load((root / "results/report/summary.yaml").read_text())
    assert summary  # the report of this experiment was written: every stage's record matched it
    # the finished train dropped the other config's checkpoints from the workspace (each version
    # holds its own), and DVC can put them back: nothing it cannot restore was deleted
    assert not kept & checkpoints(root)
    now = (root / "dvc.lock").read_text()
    (root / "dvc.lock").write_text(lock)
    dvc("checkout", "--force", "train", cwd=root)
    assert kept <= checkpoints(root)
    (root / "dvc.lock").write_text(now)
    dvc("checkout", "--force", "train", cwd=root)

    # a source that was never downloaded: DVC's normalize fails at once, saying what and how
    proc = dvc("exp", "run", "-S", "data.sources.0.name=other_train", cwd=root, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "normalize reads what was never downloaded into data/" in out, out[-3000:]
    assert "data source 'other_train'" in out and "snakemake --profile profiles/local download && dvc add data" in out
    assert "MissingInputException" not in out
