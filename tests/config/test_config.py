"""The Hydra tree composes, every shipped option validates, and bad configs fail by key path."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from ftflow import stages
from ftflow.config import params as config
from ftflow.config.params import compose
from ftflow.config.schema import validate
from ftflow.errors import ConfigError

from helpers import REPO

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")
# options that need company: a value the shipped file leaves required, or a consistent pairing
NEEDS = {
    ("model", "local"): ["model.path={local_model}", "tokenizer=model"],
    ("model", "hub"): ["tokenizer=model"],
    ("tokenizer", "model"): ["model=hub"],
    ("template", "model"): ["model=hub", "tokenizer=model"],
    ("data", "demo_preference"): ["train=dpo"],
    ("data", "demo_unpaired"): ["train=kto"],
    ("data", "demo_prompts"): ["train=grpo"],
}


def options():
    for group in GROUPS:
        for file in sorted((CONF / group).glob("*.yaml")):
            yield group, file.stem
    for file in sorted((CONF / "experiment").glob("*.yaml")):
        yield "experiment", file.stem


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """What compose requires of model=local's folder (the files, not a loadable model)."""
    folder = tmp_path_factory.mktemp("model")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text('{"model_type": "llama"}')
    return folder


@pytest.mark.parametrize("group,option", list(options()))
def test_every_shipped_option_composes_and_validates(group, option, local_model):
    needs = [o.format(local_model=local_model) for o in NEEDS.get((group, option), [])]
    tree = compose([f"{group}={option}", *needs], CONF)
    validate(tree)
    if group != "experiment" and group != "data":
        text = (CONF / group / f"{option}.yaml").read_text()
        chosen = yaml.safe_load(text)
        chosen.pop("defaults", None)
        if text.startswith("# @package _global_"):  # e.g. train=dpo also picks its data
            chosen = chosen[group]
        assert_within(chosen, tree[group])  # the option's own values made it into the tree


def assert_within(expected, actual, where=""):
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert_within(value, actual[key], f"{where}.{key}")
    elif expected != "???":
        assert actual == expected, where


def test_each_trainer_picks_the_data_it_trains_on():
    kinds = {
        m: compose([f"train={m}"], CONF)["data"].get("kind", "conversation") for m in ("sft", "dpo", "kto", "grpo")
    }
    assert kinds == {"sft": "conversation", "dpo": "preference", "kto": "unpaired", "grpo": "prompt"}
    tree = compose(["train=dpo", "peft=lora"], CONF)  # one override each
    assert (tree["train"]["method"], tree["peft"]["method"]) == ("dpo", "lora")
    assert tree["train"]["gradient_accumulation_steps"] == 1  # SFT's settings underneath


def test_default_is_the_demo():
    tree = compose([], CONF)
    assert tree["model"]["source"] == "scratch"
    assert tree["tokenizer"]["source"] == "train"
    assert [(s["path"], s["split"]) for s in tree["data"]["sources"]] == [
        ("examples/demo/train.jsonl", "train"), ("examples/demo/validation.jsonl", "validation"),
        ("examples/demo/test.jsonl", "test"),
    ]  # fmt: skip


def test_overrides_reach_the_tree():
    tree = compose(["train.learning_rate=1e-4", "peft=lora", "eval.limit=5"], CONF)
    assert tree["train"]["learning_rate"] == 1e-4
    assert tree["peft"]["method"] == "lora"
    assert tree["eval"]["limit"] == 5


def test_experiment_overrides_groups_and_keys():
    tree = compose(["experiment=demo_lora"], CONF)
    assert tree["peft"]["method"] == "lora"
    assert tree["train"]["learning_rate"] == 3e-3
    assert "experiment" not in tree


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+train.learnin_rate=1"], "train.learnin_rate: unknown key"),
        (["train.epochs=abc"], "train.epochs: Input should be a valid number"),
        (["pack.strategy=zigzag"], "pack.strategy: Input should be 'bfd' or 'none'"),
        (["model=local", "tokenizer=model"], "model.path: missing required value"),
        (["+data.sources.0.colour=red"], "data.sources[0].colour: unknown key"),
        (["tokenizer=model"], "model.source=scratch has no tokenizer of its own"),
        (["train.learning_rate=-1"], "train.learning_rate: Input should be greater than 0"),
        (["train=dpo", "data=demo"], "train.method=dpo trains on preference data but data.kind is conversation"),
        (["launcher.num_processes=2"], "launcher.distributed=none runs one process"),
        (["launcher=fsdp", "launcher.cpu=true"], "launcher.distributed=fsdp needs GPUs"),
        (["launcher=zero2", "+launcher.deepspeed.offload_params=cpu"], "offload_params needs zero_stage 3"),
        (["train.method=grpo", "data=demo_prompts"], "train.method=grpo needs train.grpo.rewards"),
        (
            ["+data.sources.0.columns={instuction:q}"],
            "columns maps ['instuction'], which reader 'alpaca' does not read",
        ),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides, CONF)
    assert message in str(err.value)


def test_a_section_check_gives_its_reason_without_the_section():
    with pytest.raises(ConfigError) as err:
        compose(["train=dpo", "data=demo"], CONF)
    assert "data.kind is conversation" in str(err.value) and len(str(err.value)) < 400, str(err.value)


@pytest.mark.parametrize(
    "reader,message",
    [
        ("missing.py:read", "reader 'missing.py:read': file "),
        ("my_readers.py:raed", "my_readers.py defines no 'raed' at its top level"),
        ("broken.py:read", "broken.py line 1: "),
    ],
)
def test_user_readers_are_checked_at_compose(tmp_path, reader, message):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "data" / "my_readers.py").write_text("import json\n\ndef read(record):\n    return record\n")
    (conf / "data" / "broken.py").write_text("def read(record)\n    return record\n")
    compose(["data.sources.0.reader=my_readers.py:read", "data.sources.1.reader=my_readers.py:json"], conf)
    with pytest.raises(ConfigError) as err:
        compose([f"data.sources.0.reader={reader}"], conf)
    assert "data.sources[0] ('demo_train'): " in str(err.value) and message in str(err.value), str(err.value)


def test_user_rewards_are_checked_at_compose():
    overrides = ["train=grpo", "train.grpo.rewards=[{name:exact_match},{name:'my_rewards.py:nope'}]"]
    with pytest.raises(ConfigError, match=r"train.grpo.rewards\[1\]: reward 'my_rewards.py:nope': file "):
        compose(overrides, CONF)


def test_bad_key_in_a_conf_file(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "pack" / "default.yaml").write_text("max_length: 128\nmax_lenght: 256\n")
    with pytest.raises(ConfigError, match=r"pack\.max_lenght: unknown key"):
        compose([], conf)


def test_the_committed_params_yaml_is_what_conf_composes_to():
    """A fresh clone's `dvc repro` starts with `ftflow compose --check`: the params.yaml in the
    repository must be current (an edit of conf/ without recomposing it once slipped through)."""
    tree, overrides = config.read_params(REPO / "params.yaml")
    assert overrides == [] and tree == compose([], CONF)


def test_params_roundtrip_and_staleness(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    params = tmp_path / "params.yaml"
    tree = compose(["train.learning_rate=2e-4"], conf)
    config.write_params(tree, ["train.learning_rate=2e-4"], params)
    assert config.load_checked(params, conf).params == tree  # recomposes with the recorded overrides

    (conf / "train" / "sft.yaml").write_text(
        (conf / "train" / "sft.yaml").read_text().replace("epochs: 5", "epochs: 7")
    )
    with pytest.raises(
        ConfigError, match=r"stale .*params.yaml.*train\.epochs.*ftflow compose train.learning_rate=2e-4"
    ):
        config.load_checked(params, conf)


def test_a_passed_check_is_reused_only_while_nothing_it_read_changed(tmp_path):
    """The Snakefile's parse reuses a passed check (no Hydra import, no recomposition, no schema
    class built) and its validated tree; a hand edit of params.yaml, or of anything under conf/,
    is checked again and refused."""
    import shutil
    import subprocess
    import sys

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    params = tmp_path / "params.yaml"
    config.write_params(compose([], conf), [], params)
    check = ("import json, sys; from ftflow.config import params as config; checked = config.load_checked(sys.argv[1], sys.argv[2]); "
             "print(json.dumps([checked.valid, 'hydra' in sys.modules, 'ftflow.config.schema' in sys.modules]))")  # fmt: skip

    def checked_in_a_new_process() -> tuple[dict, bool]:
        """(the validated tree, whether the check composed and validated)"""
        out = subprocess.run([sys.executable, "-c", check, str(params), str(conf)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        valid, hydra, schema = json.loads(out.stdout)
        assert hydra == schema
        return valid, hydra

    def hydra_imported() -> bool:
        return checked_in_a_new_process()[1]

    assert hydra_imported()  # the first check composes and validates
    valid, checked = checked_in_a_new_process()
    assert (tmp_path / config.CHECKED).exists() and not checked  # reused
    assert valid == validate(config.read_params(params)[0]).model_dump(mode="json")  # defaults filled in

    text = params.read_text()
    params.write_text(text.replace("max_length: 512", "max_length: 256"))  # valid, but not conf/'s
    with pytest.raises(ConfigError, match=r"stale .*params.yaml.*pack\.max_length"):
        config.load_checked(params, conf)
    params.write_text(text)
    assert config.load_checked(params, conf).params["pack"]["max_length"] == 512
    (conf / "data" / "my_reader.py").write_text("def read(record): return record\n")  # any conf/ file
    assert hydra_imported()


def test_stage_params_are_projections():
    tree = compose([], CONF)
    assert set(config.stage_params(tree, "evaluate")) == {"model", "eval"}
    download = config.stage_params(tree, "download")
    # where data comes from, not how it is read: a new limit must not re-download
    assert "limit" not in download["data"]["sources"][0] and "reader" not in download["data"]["sources"][0]
    changed = compose(["+data.sources.0.limit=10"], CONF)
    assert config.stage_params(changed, "download") == download
    assert config.stage_params(changed, "normalize") != config.stage_params(tree, "normalize")


def test_headerless_params_are_checked_by_conf_digest(tmp_path):
    """params.yaml as DVC's Hydra integration writes it: no recorded overrides, only the
    conf_digest resolved at compose time."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(compose(["peft=lora"], conf)))
    assert config.load_checked(params, conf).params["peft"]["method"] == "lora"  # overrides are fine

    pack = conf / "pack" / "default.yaml"
    pack.write_text(pack.read_text().replace("max_length: 512", "max_length: 256"))
    with pytest.raises(ConfigError, match=r"stale .*params.yaml: conf/ changed since it was composed"):
        config.load_checked(params, conf)


def test_comment_only_conf_edit_keeps_recorded_params_valid(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    params = tmp_path / "params.yaml"
    config.write_params(compose([], conf), [], params)
    (conf / "pack" / "default.yaml").write_text((conf / "pack" / "default.yaml").read_text() + "# a note\n")
    assert config.load_checked(params, conf).params["pack"]["max_length"] == 512


def test_slurm_resources_come_from_the_slurm_section_and_the_launcher():
    from ftflow.workflow.slurm import resources

    tree = compose(["launcher=gpu", "launcher.num_processes=4", "launcher.nodes=2", "slurm.account=proj",
                    "slurm.partition=cpu", "slurm.jobs.train.partition=gpu", "slurm.qos=high"], CONF)  # fmt: skip
    train, pack = resources(tree, "train"), resources(tree, "pack")
    # GPUs per node and nodes from the launcher (the processes accelerate starts), per stage job size
    assert train == {"slurm_partition": "gpu", "slurm_account": "proj", "qos": "high", "cpus_per_task": 8,
                     "mem_mb": 64000, "runtime": 1440, "nodes": 2, "gres": "gpu:4", "mpi": "srun", "tasks": 2,
                     "tasks_per_gpu": 0, "slurm_extra": "--signal=TERM@300"}  # fmt: skip
    assert pack == {"slurm_partition": "cpu", "slurm_account": "proj", "qos": "high", "cpus_per_task": 4,
                    "mem_mb": 16000, "runtime": 120}  # fmt: skip
    # one CPU node: no GPUs, no srun of its own; a retry asks for more time when configured
    cpu = resources(compose(["slurm.runtime_growth=2", "slurm.jobs.train.runtime=30"], CONF), "train")
    assert cpu["nodes"] == 1 and not {"gres", "mpi", "tasks"} & cpu.keys()
    assert [cpu["runtime"](None, attempt) for attempt in (1, 2, 3)] == [30, 60, 120]
    # the slurm section is no stage's params: changing it reruns nothing
    assert all("slurm" not in config.stage_params(tree, s) for s in stages.NAMES)


def test_a_misspelt_slurm_key_is_an_error():
    with pytest.raises(ConfigError, match="slurm.jobs.train.memory"):
        compose(["+slurm.jobs.train.memory=10"], CONF)


def test_a_train_job_gets_its_gpus_from_the_launcher_the_others_from_their_job():
    from ftflow.workflow.slurm import resources

    tree = validate(compose(["slurm.jobs.evaluate.gpus=1", "slurm.jobs.consolidate.gpus=2"], CONF)).model_dump()
    assert resources(tree, "evaluate")["gres"] == "gpu:1" and resources(tree, "consolidate")["gres"] == "gpu:2"
    assert "gres" not in resources(tree, "pack")
    with pytest.raises(ConfigError, match="slurm.jobs.train.gpus: the train job's GPUs come from launcher"):
        compose(["+slurm.jobs.train.gpus=1"], CONF)


def test_a_train_runtime_within_the_stop_signal_lead_is_refused():
    with pytest.raises(
        ConfigError, match=r"slurm.jobs.train.runtime=5 minutes is not longer than slurm.stop_signal_s=300"
    ):
        compose(["slurm.jobs.train.runtime=5"], CONF)
    compose(["slurm.jobs.train.runtime=6", "slurm.stop_signal_s=60"], CONF)  # the Slurm test's short job


# --- inputs the config names are checked at compose --------------------------------------------


def model_error(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        compose(["model=local", "tokenizer=model", "template=model", *overrides], CONF)
    return str(err.value)


def test_a_local_model_path_must_be_an_hf_model_directory(tmp_path):
    assert "model.path: /nonexistent/model does not exist (model=local reads an HF model directory)" in model_error(
        ["model.path=/nonexistent/model"]
    )
    (tmp_path / "empty").mkdir()
    message = model_error([f"model.path={tmp_path / 'empty'}"])
    assert f"model.path: {tmp_path / 'empty'} is not an HF model directory: it lacks config.json; weights" in message
    assert "tokenizer files" in message
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert "is a file, not an HF model directory; a .gguf file is read with model=gguf" in model_error(
        [f"model.path={tmp_path / 'm.gguf'}"]
    )
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{'model_type': 'llama'}")  # not JSON
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    assert model_error([f"model.path={tmp_path / 'half'}"]).endswith(
        "it lacks weights (*.safetensors or pytorch_model*.bin)"
    )
    (tmp_path / "half" / "model.safetensors").write_bytes(b"")
    assert "config.json is not valid JSON" in model_error([f"model.path={tmp_path / 'half'}"])
    (tmp_path / "half" / "config.json").write_text('{"model_type": "llama"}')
    assert model_error([f"model.path={tmp_path / 'half'}"]).endswith(": empty weights file(s) model.safetensors")


def test_a_gguf_file_and_the_data_paths_must_exist():
    with pytest.raises(ConfigError, match=r"model.path: /x/y.gguf is not a file \(model=gguf reads a .gguf file\)"):
        compose(["model=smollm2", "model.path=/x/y.gguf"], CONF)
    with pytest.raises(ConfigError, match=r"model.path: pkg:no_such_pkg/m.gguf: no installed package 'no_such_pkg'"):
        compose(["model=smollm2", "model.path=pkg:no_such_pkg/m.gguf"], CONF)
    with pytest.raises(ConfigError) as err:
        compose(["data.sources.0.path=examples/nope.jsonl", "data.sources.1.path=examples/*.nope"], CONF)
    assert "data.sources[0].path ('demo_train'): examples/nope.jsonl does not exist" in str(err.value)
    assert "data.sources[1].path ('demo_validation'): examples/*.nope matches no file" in str(err.value)


def test_params_yaml_written_by_dvc_is_checked_for_its_inputs_too(tmp_path):
    """DVC's Hydra integration writes params.yaml without ftflow compose: the check of the
    Snakefile's parse checks the inputs it names."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    tree = compose([], conf)
    tree["data"]["sources"][0]["path"] = "examples/gone.jsonl"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    with pytest.raises(
        ConfigError, match=r"data.sources\[0\].path \('demo_train'\): examples/gone.jsonl does not exist"
    ):
        config.load_checked(params, conf)


# --- a misspelt key or option ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.learnig_rate=1e-4", "train.learnig_rate: unknown key — did you mean train.learning_rate?"),
        ("+train.learnig_rate=1e-4", "train.learnig_rate: unknown key — did you mean train.learning_rate?"),
        ("trian.epochs=3", "trian.epochs: unknown key — did you mean train.epochs?"),
        ("data.sources.0.pth=x", "data.sources.0.path?"),
        ("+data.sources.0.pth=x", "data.sources[0].pth: unknown key — did you mean data.sources[0].path?"),
        ("+slurm.jobs.train.runtme=5", "did you mean slurm.jobs.train.runtime?"),
        (
            "model=smolm2",
            "model=smolm2: no option 'smolm2' in conf/model/ (options: hub, local, smollm2, tiny_llama) "
            "— did you mean model=smollm2?",
        ),  # fmt: skip
        ("train.zzzz=1", "train.zzzz: unknown key"),
        ("peft.r=16", "peft.r: not set in conf/ (its default applies); Hydra sets such a key with a +: +peft.r=16"),
    ],
)
def test_a_misspelt_key_or_option_gets_did_you_mean(override, message):
    with pytest.raises(ConfigError) as err:
        compose([override], CONF)
    assert message in str(err.value) and "+train" not in str(err.value), str(err.value)
    assert "To append to your config" not in str(err.value)


def test_a_task_yamls_data_files_must_exist(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    task = conf / "eval/tasks/demo_words.yaml"
    task.write_text(task.read_text().replace("examples/demo/test.jsonl", "examples/demo/gone.jsonl"))
    with pytest.raises(ConfigError) as err:
        compose([], conf)
    assert f"eval.tasks ('demo_words'): {task} reads examples/demo/gone.jsonl, which does not exist" in str(err.value)


@pytest.fixture
def own_data(tmp_path, monkeypatch):
    """A copy of conf/ beside a user's conversations (conf/data/mine.yaml, no test split), and
    conf/data/sms_spam.yaml's data (a test source of its own) with its files."""
    shutil.copytree(CONF, tmp_path / "conf")
    (tmp_path / "mine.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                         '{"role": "assistant", "content": "hello"}]}\n')  # fmt: skip
    (tmp_path / "conf/data/mine.yaml").write_text(
        "sources:\n  - name: mine\n    path: mine.jsonl\n    reader: messages\n"
    )
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)  # data paths are relative to the repository root
    return tmp_path / "conf"


def test_the_default_evaluation_never_scores_the_demo_tasks_on_other_data(own_data):
    """eval=demo's word tasks read examples/demo/test.jsonl: on data from elsewhere the default
    becomes the test split's holdout task, or no evaluation without a test split, with a line
    saying so; a person's own choice, and the demo's data in any of its forms, keep it."""

    def fitted(*overrides):
        notes = []
        return compose(list(overrides), own_data, notes=notes)["eval"]["tasks"], " ".join(notes)

    tasks, note = fitted("data=sms_spam")
    assert tasks == ["holdout"]
    assert note == ("eval: the default eval=demo scores examples/demo/test.jsonl, which is not your data; evaluating "
                    "your test split instead (eval=holdout; choose another with eval=...)")  # fmt: skip
    tasks, note = fitted("data=mine")
    assert tasks == [] and "not evaluating (eval=none). Carve a test split with data.test_size=0.1" in note
    assert fitted("data=mine", "data.test_size=0.2", "eval.limit=5") == (["holdout"], note.replace(
        "not evaluating (eval=none). Carve a test split with data.test_size=0.1 to score your own held-out "
        "conversations (eval=holdout), or choose eval=...",
        "evaluating your test split instead (eval=holdout; choose another with eval=...)"))  # fmt: skip
    assert compose(["data=mine", "data.test_size=0.2", "eval.limit=5"], own_data)["eval"]["limit"] == 5
    for chosen in (["experiment=sms_spam"], [], ["train=dpo"], ["train=grpo"], ["data=alpaca_en_demo"]):
        tasks, note = fitted(*chosen)
        assert note == "" and tasks != ["holdout"], chosen
    for chosen in (["data=sms_spam", "eval=demo"], ["data=mine", "eval.tasks=[demo_words]"]):
        tasks, note = fitted(*chosen)  # kept, and said
        assert tasks[0] == "demo_words" and note == (
            "eval: the evaluation you chose scores examples/demo/test.jsonl, which is not your data: its scores say "
            "nothing about it (eval=holdout scores your test split)")  # fmt: skip


def test_the_holdout_task_needs_a_test_split_of_conversations(own_data):
    with pytest.raises(ConfigError, match=r"eval task 'holdout' scores your test split, and your data has none: "
                                          r"carve one from the training records with data.test_size=0.1"):  # fmt: skip
        compose(["data=mine", "eval=holdout"], own_data)
    with pytest.raises(ConfigError, match=r"eval task 'holdout' answers conversations .* data.kind is preference"):
        compose(["train=dpo", "eval=holdout"], own_data)
    assert compose(["data=mine", "eval=none"], own_data)["eval"]["tasks"] == []


def test_a_params_yaml_composed_by_dvc_with_the_demo_tasks_on_other_data_is_refused(own_data):
    """DVC's Hydra integration writes what conf/ composes to, the default eval included: the
    check refuses it on other data and names the -S that fixes it."""
    params = own_data.parent / "params.yaml"
    tree, _ = config._composed(["data=mine"], own_data)  # as DVC composes: no fitting
    tree.pop("experiment", None)
    params.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"the default eval=demo scores examples/demo/test.jsonl, which is not your "
                                          r"data: choose the evaluation with -S eval=none"):  # fmt: skip
        config.load_checked(params, own_data)
    tree, _ = config._composed(["data=mine", "eval=none"], own_data)
    tree.pop("experiment", None)
    params.write_text(yaml.safe_dump(tree))
    assert config.load_checked(params, own_data).params["eval"]["tasks"] == []
