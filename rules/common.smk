# Config loading, paths and input functions shared by the rules.
from ftflow import config as ftconfig
from ftflow import paths
from ftflow.normalize import SPLITS
from ftflow.pack import PACKED_SPLITS
from ftflow.readers import reader_file

# Validated, and checked against a fresh composition of conf/ (stale params.yaml is an error).
PARAMS = ftconfig.load_checked(ftconfig.PARAMS_FILE)
MODEL = PARAMS["model"]
SCRATCH = MODEL["source"] == "scratch"


def params_of(stage):
    """The config sections a stage reads: a change elsewhere does not rerun it."""
    return ftconfig.stage_params(PARAMS, stage)


def code(*modules):
    """A stage's own modules, as inputs: editing its logic reruns it and what follows."""
    return [f"src/ftflow/{m}.py" for m in modules]


def local_sources():
    """Local data sources (and a local model): editing them reruns download."""
    found = [s["path"] for s in PARAMS["data"]["sources"] if s.get("path")]
    return found + ([MODEL["path"]] if MODEL["source"] == "local" else [])


def user_readers():
    """User reader files ("file.py:function", under conf/data/): editing one reruns normalize."""
    files = {reader_file(s["reader"]) for s in PARAMS["data"]["sources"]}
    return sorted(str(f) for f in files if f is not None)


def raw_dirs():
    return [directory(f"{paths.RAW}/{s['name']}") for s in PARAMS["data"]["sources"]]


def base_model():
    """The base weights: downloaded (hub/local) or initialised by train (scratch)."""
    return paths.base_model_dir(MODEL)


def packed_dirs():
    return [directory(f"{paths.PACK}/{s}") for s in PACKED_SPLITS]
