"""Hydra composition of conf/ into params.yaml, its check, and the per-stage projection of the
composed tree. The schema the check validates against is ftflow.config.schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from ftflow import stages
from ftflow.config import locations
from ftflow.errors import ConfigError

if TYPE_CHECKING:
    from ftflow.config.schema import Config

CONF_DIR = Path("conf")  # workflows run from the repository root
PARAMS_FILE = "params.yaml"
OVERRIDES_HEADER = "# ftflow compose overrides: "


# Keys that say *where* data comes from; the rest (limit, reader, split) is normalize's business
# and must not trigger a re-download.
_SOURCE_LOCATION_KEYS = ("name", "path", "hub", "revision", "files")
_MODEL_LOCATION_KEYS = ("name", "source", "hub_id", "revision", "path")


def conf_digest(conf_dir: Path = CONF_DIR) -> str:
    """A hash of the YAML that Hydra composes (task YAMLs under eval/tasks are the evaluate
    rule's inputs, not config). Written into the tree at compose time, so a params.yaml
    composed by anyone, `ftflow compose` or DVC's Hydra integration, says which conf/ it
    came from."""
    h = hashlib.sha256()
    root = Path(conf_dir)
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("eval/tasks/"):
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def register_resolvers(conf_dir: Path = CONF_DIR) -> None:
    """`${ftflow_conf_digest:}` in conf/config.yaml resolves to conf_digest(conf_dir)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ftflow_conf_digest", lambda: conf_digest(conf_dir), replace=True)


def compose(overrides: list[str] | tuple[str, ...] = (), conf_dir: Path = CONF_DIR, notes: list | None = None) -> dict:
    """Compose conf/ with Hydra overrides, resolve interpolations, and validate. When the
    default evaluation does not fit the data, the one that does replaces it, and `notes` gets a
    line saying so (see fitted_eval)."""
    tree, choices = _composed(overrides, conf_dir)
    fitted = fitted_eval(tree, choices, overrides, Path(conf_dir))
    if fitted:
        option, why = fitted
        if option:
            tree, _ = _composed([*overrides, f"eval={option}"], conf_dir)
        if notes is not None:
            notes.append(why)
    tree.pop("experiment", None)  # the experiment group only overrides other groups
    from ftflow.config.schema import validate

    config = validate(tree)
    check_user_code(config, Path(conf_dir))
    locations.check(config, Path(conf_dir))
    return tree


def _composed(overrides, conf_dir: Path) -> tuple[dict, dict]:
    """(the composed tree, resolved; the option Hydra took for each config group)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers(conf_dir)
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        what = "missing required value" if "Missing mandatory" in str(err) else str(err).splitlines()[0]
        raise ConfigError(f"invalid config:\n  {key}: {what} (set it in conf/ or as an override)") from None
    except HydraException as err:
        msg = " ".join(str(err).split())
        raise ConfigError(
            composition_error(msg, conf_dir, overrides)
            or f"cannot compose conf/ with overrides {list(overrides)}: {msg}"
        ) from None
    return tree, choices


def fitted_eval(tree: dict, choices: dict, overrides, conf_dir: Path) -> tuple[str | None, str] | None:
    """(eval option, the line that says why) when the evaluation does not fit the data: its
    tasks read local files (the demo's word tasks read the demo's test file) and none of them
    lies in the folder of one of the data's sources (the demo's conversation, preference and
    prompt data all live beside it), so its scores would measure nothing about this data. The
    default evaluation is replaced: by the test split's holdout task, or without a test split by
    none. An evaluation a person chose (eval=..., eval.tasks=..., an experiment's) stays (option
    None), with the line saying what it scores."""
    task_files = {(conf_dir.parent / f).resolve() for t in tree["eval"]["tasks"]
                  for f in locations.task_data_files(t, conf_dir)}  # fmt: skip
    data = {(conf_dir.parent / s["path"]).resolve().parent for s in tree["data"]["sources"] if s.get("path")}
    if not task_files or {f.parent for f in task_files} & data:
        return None
    reads = ", ".join(sorted(str(f.relative_to(conf_dir.parent.resolve())) for f in task_files))
    default = default_option("eval", conf_dir)
    chosen = {o.lstrip("+~").partition("=")[0] for o in overrides} & {"eval", "eval.tasks"}
    if chosen or choices.get("eval") != default:
        return None, (f"eval: the evaluation you chose scores {reads}, which is not your data: its scores say "
                      "nothing about it (eval=holdout scores your test split)")  # fmt: skip
    head = f"eval: the default eval={default} scores {reads}, which is not your data;"
    splits = {s.get("split", "train") for s in tree["data"]["sources"]}
    has_test = "test" in splits or tree["data"].get("test_size") is not None
    if has_test and tree["data"].get("kind", "conversation") == "conversation":
        return "holdout", f"{head} evaluating your test split instead (eval=holdout; choose another with eval=...)"
    return "none", (f"{head} not evaluating (eval=none). Carve a test split with data.test_size=0.1 to score "
                    "your own held-out conversations (eval=holdout), or choose eval=...")  # fmt: skip


def refuse_unfitted_eval(tree: dict, conf_dir: Path) -> None:
    """A params.yaml that DVC's Hydra integration composed gets no fitted evaluation (DVC writes
    what conf/ composes to): refuse the default one on data it does not fit, naming the choice."""
    default = default_option("eval", conf_dir)
    default_tasks = yaml.safe_load((Path(conf_dir) / "eval" / f"{default}.yaml").read_text()).get("tasks")
    fitted = tree["eval"]["tasks"] == default_tasks and fitted_eval(tree, {"eval": default}, (), Path(conf_dir))
    if fitted and fitted[0]:
        option, why = fitted
        raise ConfigError(f"{why.partition(';')[0]}: choose the evaluation with -S eval={option} "
                          f"(or -S eval=holdout with -S data.test_size=0.1, or another eval=)")  # fmt: skip


def default_option(group: str, conf_dir: Path) -> str | None:
    """The option conf/config.yaml's defaults list picks for a group."""
    defaults = yaml.safe_load((Path(conf_dir) / "config.yaml").read_text()).get("defaults", [])
    return next((d[group] for d in defaults if isinstance(d, dict) and group in d), None)


def composition_error(msg: str, conf_dir: Path, overrides=()) -> str | None:
    """Hydra's refusals a person meets most, said in ftflow's words: a misspelt key (Hydra's
    own hint, "use +key=value", only leads to a second error) and a group option that does not
    exist. None for anything else."""
    import difflib
    import re

    from ftflow.config.schema import did_you_mean, known_key

    if "LexerNoViableAltException" in msg or "no viable alternative" in msg:
        bad = [o for o in overrides if "[" in o.partition("=")[0]] or list(overrides)
        return (f"cannot read the override {' '.join(bad)}: Hydra's overrides name list items with dots, not "
                "brackets (data.sources.0.reader=messages), and a value with spaces or brackets is quoted: "
                "'eval.tasks=[a,b]'")  # fmt: skip
    key = re.match(r"Could not override '([^']+)'", msg)
    if key and known_key(key.group(1)):  # a real key that conf/ leaves to its default
        value = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == key.group(1)), "...")
        return (f"invalid config:\n  {key.group(1)}: not set in conf/ (its default applies); Hydra sets such a key "
                f"with a +: +{key.group(1)}={value}")  # fmt: skip
    if key:
        return f"invalid config:\n  {key.group(1)}: unknown key{did_you_mean(key.group(1))}"
    option = re.search(r"Could not find '([\w/]+)/([^'/]+)'", msg)
    if option:
        group, name = option.groups()
        options = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f" — did you mean {group}={close[0]}?" if close else ""
        return (f"invalid config:\n  {group}={name}: no option {name!r} in conf/{group}/ "
                f"(options: {', '.join(options)}){hint}")  # fmt: skip
    return None


def check_user_code(config: Config, conf_dir: Path) -> None:
    """Every user reader (conf/data/) and reward (conf/train/) names a file that defines it."""
    from ftflow.data.readers import READERS, check_user_function
    from ftflow.train.rewards import BUILTIN

    found = [(f"data.sources[{i}] ({s.name!r})", s.reader, conf_dir / "data", "reader")
             for i, s in enumerate(config.data.sources) if s.reader not in READERS]  # fmt: skip
    rewards = config.train.grpo.rewards if config.train.grpo else []
    found += [(f"train.grpo.rewards[{i}]", r.name, conf_dir / "train", "reward")
              for i, r in enumerate(rewards) if r.name not in BUILTIN]  # fmt: skip
    for where, spec, base, what in found:
        try:
            check_user_function(spec, base, what)
        except ValueError as err:
            raise ConfigError(f"invalid config:\n  {where}: {err}") from None


def write_params(tree: dict, overrides: list[str], path: str | Path = PARAMS_FILE) -> None:
    """Write the composed tree as params.yaml, recording the overrides in a header line."""
    text = OVERRIDES_HEADER + json.dumps(list(overrides)) + "\n"
    text += "# written by `ftflow compose`; edit conf/, not this file\n"
    text += yaml.safe_dump(tree, sort_keys=False)
    Path(path).write_text(text)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, with libyaml's parser where PyYAML has it: ten times faster, and the
    Snakefile's parse (every dry run, DVC stage and Slurm job step) reads several YAML files."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_params(path: str | Path = PARAMS_FILE) -> tuple[dict, list[str] | None]:
    """Read params.yaml; returns the tree and the recorded overrides (None if not recorded)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: compose it first with `ftflow compose [overrides]`")
    text = path.read_text()
    first = text.splitlines()[0] if text else ""
    overrides = json.loads(first[len(OVERRIDES_HEADER) :]) if first.startswith(OVERRIDES_HEADER) else None
    return load_yaml(text), overrides


CHECKED = Path(".snakemake/ftflow/params-checked")  # beside params.yaml; Snakemake's own folder


class Checked(NamedTuple):
    params: dict  # params.yaml as written: what the stages get, and what DVC compares
    valid: dict  # the same tree validated, every default filled in (ftflow.config.schema.Config)


def load_checked(path: str | Path = PARAMS_FILE, conf_dir: Path = CONF_DIR) -> Checked:
    """Load params.yaml, validate it, and refuse it if conf/ has changed since it was composed.

    Snakemake parses the Snakefile, and so calls this, for every dry run, every DVC stage and every
    Slurm job step; recomposing conf/ with Hydra, and even building the schema's classes, costs
    more than the rest of the parse. So a check that passed is recorded (CHECKED), with the
    validated tree, under a key of everything it depends on, and skipped while the key holds;
    any change to those, a hand edit of params.yaml included, checks again."""
    path = Path(path)
    record = path.parent / CHECKED
    key = _check_key(path, conf_dir)
    recorded = _recorded(record)
    if recorded.get("key") == key:
        return Checked(read_params(path)[0], recorded["valid"])
    checked = _check(path, conf_dir)
    record.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=record.name)
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "valid": checked.valid}, f)
    os.replace(tmp, record)  # atomic: a concurrent reader (another job step) sees one record or the other
    return checked


def _recorded(record: Path) -> dict:
    """The recorded check, or {} if there is none (or one in an earlier ftflow's format)."""
    try:
        recorded = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _check_key(path: Path, conf_dir: Path) -> str:
    """What the check reads: params.yaml's bytes, every file under conf/ (YAML, user readers and
    rewards), ftflow's code (schema, composition, readers) and the installed packages (the names
    of site-packages' entries carry their versions: Hydra's, pydantic's)."""
    h = hashlib.sha256(path.read_bytes() if path.exists() else b"")
    code = sorted(Path(__file__).parents[1].rglob("*.py"))
    conf = [p for p in Path(conf_dir).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for f in sorted(conf) + code:
        h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
    site_packages = Path(yaml.__file__).parents[1]
    h.update("\0".join(sorted(os.listdir(site_packages))).encode())
    return h.hexdigest()


def _check(path: Path, conf_dir: Path) -> Checked:
    from ftflow.config.schema import validate

    tree, overrides = read_params(path)
    config = validate(tree)
    locations.check(config, conf_dir)  # params.yaml written by DVC's Hydra integration was never composed by us
    valid = config.model_dump(mode="json")
    if overrides is not None:
        # composed by `ftflow compose`: recompose with the same overrides, compare everything
        # but the digest (a comment-only edit of conf/ changes nothing that matters)
        fresh = compose(overrides, conf_dir)
        fresh.pop("conf_digest", None)
        changed = sorted(_diff_keys(fresh, {k: v for k, v in tree.items() if k != "conf_digest"}))
        if changed:
            raise ConfigError(
                f"stale {path}: conf/ no longer composes to it (differs at {', '.join(changed[:8])}). "
                f"Recompose with `ftflow compose {' '.join(overrides)}`".rstrip()
                + "."
            )
    elif tree.get("conf_digest") != conf_digest(conf_dir):
        # composed elsewhere (DVC's Hydra integration records no overrides): the digest tells
        raise ConfigError(
            f"stale {path}: conf/ changed since it was composed (conf_digest "
            f"{tree.get('conf_digest')} != {conf_digest(conf_dir)}). Recompose with "
            "`ftflow compose [overrides]` or `dvc exp run -S [overrides]`."
        )
    if overrides is None:
        refuse_unfitted_eval(tree, conf_dir)
    return Checked(tree, valid)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return set().union(*(_diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k) for k in keys))
    return set() if a == b else {prefix or "<root>"}


def stage_params(tree: dict, stage: str) -> dict:
    """The part of the config a stage may read; a rule's `params:` and nothing more."""
    out = {name: tree[name] for name in stages.BY_NAME[stage].sections}
    if stage == "download":
        out["data"] = {"sources": [{k: s.get(k) for k in _SOURCE_LOCATION_KEYS} for s in tree["data"]["sources"]]}
        out["model"] = {k: tree["model"].get(k) for k in _MODEL_LOCATION_KEYS}
        out["eval"] = {"datasets": tree["eval"].get("datasets") or []}  # the built-in tasks' data
    return out


def rule_params(tree: dict, stage: str) -> dict:
    """What a change of reruns the stage: its rule's `params:` (Snakemake's rerun trigger), its
    sections without what it reads at run time (Stage.read_at_run: a section, or section.key)."""
    return without_run_time(stage_params(tree, stage), stage)


def without_run_time(sections: dict, stage: str) -> dict:
    """A stage's sections without what it reads at run time (Stage.read_at_run)."""
    out = dict(sections)
    for entry in stages.BY_NAME[stage].read_at_run:
        section, _, key = entry.partition(".")
        if not key:
            out.pop(section, None)
        elif isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def write_stage_config(section: dict, out_dir: str | Path) -> None:
    """Each stage writes the exact config it ran with beside its outputs."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
