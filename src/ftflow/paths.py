"""Where each stage reads and writes, relative to the repository root.

The rules in rules/*.smk and the `ftflow <stage>` command both use these names, so a stage
run by hand writes exactly where Snakemake expects it.
"""

RAW = "data/raw"  # data/raw/<source name>/   as downloaded
MODELS = "data/models"  # data/models/<model name>/ as downloaded
MANIFEST = "data/manifest.json"  # what was downloaded: uri, resolved revision, file hashes
MANIFESTS = "data/manifests"  # sources/, models/, eval/<key>.json: one download job's entry
# lm-eval built-in tasks' hub data as the `datasets` library caches it (HF_DATASETS_CACHE):
# written by download on the login node, read by evaluate with the hub offline
EVAL_DATA = "data/eval"

NORMALIZE = "results/normalize"  # <split>.parquet + stats.json
PACK = "results/pack"  # train/ (Arrow), tokenizer/, stats.json
TRAIN = "results/train"  # model/, init/ (scratch), checkpoints/, loss.csv, summary.json
TRAIN_INIT = f"{TRAIN}/init"  # a scratch model's initial weights; for a pretrained one a note (always written)
CHECKPOINTS = f"{TRAIN}/checkpoints"  # <config fingerprint>/checkpoint-<step>/: resume points
WORKERS = f"{TRAIN}/workers"  # <rank>.pid, <rank>.json: each training process and how it ended
CONSOLIDATE = "results/consolidate"  # model/ (one plain HF model directory)
EVALUATE = "results/eval"  # base/, tuned/ (lm-eval results), metrics.json
REPORT = "results/report"  # the report's files; the HTML report itself: results/report.html
# the report's files (rules/report.smk gives each its caption): name -> file in REPORT
REPORT_FILES = {
    "normalize": "normalize.html",
    "pack": "pack.html",
    "loss": "loss.svg",
    "evaluate": "eval.html",
    "provenance": "provenance.html",
    "summary": "summary.yaml",  # the first page's figures
}
LOGS = "logs"
# the stages that write config.yaml (the config they ran with) beside their outputs, as an
# output: DVC versions it with them (ftflow.freshness compares it with the current config)
RECORDING = {"normalize": NORMALIZE, "pack": PACK, "train": TRAIN, "consolidate": CONSOLIDATE, "evaluate": EVALUATE}

# user code and task files that conf/ names, resolved from these folders
READERS = "conf/data"  # data.sources[].reader: "file.py:function"
REWARDS = "conf/train"  # train.grpo.rewards[].name: "file.py:function"
TASKS = "conf/eval/tasks"  # eval.tasks: <name>.yaml, lm-eval task configs
HOLDOUT = "holdout"  # eval.tasks' name for ftflow's own task: the test split, scored by evaluate's holdout.py

SPLITS = ("train", "validation", "test")  # normalize's splits (results/normalize/<split>.parquet)
PACKED_SPLITS = ("train", "validation")  # pack's (results/pack/<split>/): test is for evaluate only
HOLDOUT_DATA = f"{NORMALIZE}/test.parquet"  # what the holdout task scores


def base_model_dir(model: dict) -> str:
    """The starting weights: downloaded for hub/local, initialised by train for scratch."""
    if model["source"] == "scratch":
        return TRAIN_INIT
    return f"{MODELS}/{model['name']}"


def source_manifest(name: str) -> str:
    return f"{MANIFESTS}/sources/{name}.json"


def model_manifest(name: str) -> str:
    return f"{MANIFESTS}/models/{name}.json"


def eval_manifest(key: str) -> str:
    return f"{MANIFESTS}/eval/{key}.json"


def eval_dataset_key(hub: str, name: str | None) -> str:
    """openai/gsm8k, main -> openai--gsm8k--main: a file name, as the hub cache names repos."""
    return "--".join([*hub.split("/"), *([name] if name else [])])
