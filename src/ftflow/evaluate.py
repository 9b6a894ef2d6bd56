"""evaluate: lm-evaluation-harness on the base and the tuned model; one flat metrics.json.

A task is an lm-eval task YAML of conf/eval/tasks/, or else one of lm-eval's built-in tasks or
groups (gsm8k, arc_easy, mmlu, ...). A task YAML's `dataset_kwargs.data_files` may name local
files (the demo task reads examples/demo/test.jsonl, the held-out records, so it evaluates
whatever trainer and data kind produced the model); relative paths are resolved against the
repository root here, those files are the rule's inputs, and the task config actually run is
written beside the results. A built-in task's hub data is fetched by download on the login node
(eval.datasets) into data/eval/, and read from there with the hub offline: compute nodes often
have no internet, and the data evaluated is the revision the manifest records.

Each model is evaluated with its own tokenizer: the tuned model with the one consolidate saved
beside it, the base with its own when it ships one (see base_tokenizer). Every task, metric and
filter is a score of its own (see score_name).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from ftflow import contamination, holdout, paths
from ftflow.config.params import write_stage_config
from ftflow.config.schema import Eval, Model, StageConfig
from ftflow.errors import StageError

log = logging.getLogger(__name__)


class EvaluateError(StageError):
    pass


TASKS_DIR = Path(paths.TASKS)
# lm-eval reports metrics as "<metric>,<filter>"; these keys are bookkeeping, not scores
_NOT_SCORES = ("alias", "samples")
# lm-eval's name for the filter of a task without a filter_list (take the first response as is)
NO_FILTER = "none"
# either file makes a folder a tokenizer AutoTokenizer can load
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def task_specs(names: list[str], root: Path) -> list[dict | str]:
    """Each configured task as lm-eval takes it: a task YAML of conf/eval/tasks/ as its config,
    any other name as itself (one of lm-eval's built-in tasks, groups or tags)."""
    return [task_config(name, root) if (root / TASKS_DIR / f"{name}.yaml").exists() else name for name in names]


def task_config(name: str, root: Path) -> dict:
    path = root / TASKS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (root / TASKS_DIR).glob("*.yaml"))
        raise FileNotFoundError(f"eval task {name!r}: no {path} (shipped tasks: {known})")
    task = yaml.safe_load(path.read_text())
    files = task.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        task["dataset_kwargs"]["data_files"] = {k: str((root / v).resolve()) for k, v in files.items()}
    return task


def eval_backend(requested: str) -> str:
    """hf (transformers, the default) or vllm (pip install -e '.[vllm]', CUDA only)."""
    import importlib.util

    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if requested == "vllm" and not has_vllm:
        raise EvaluateError(
            "eval.backend=vllm needs vLLM installed (pip install -e '.[vllm]') and a CUDA GPU; use eval.backend=hf"
        )
    return "vllm" if requested == "vllm" or (requested == "auto" and has_vllm) else "hf"


def load_vllm(model_dir: Path, tokenizer_dir: Path, cfg: Eval):
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(model_dir), tokenizer=str(tokenizer_dir), batch_size="auto",
                max_gen_toks=cfg.max_gen_toks, seed=cfg.seed)  # fmt: skip


def load_model(model_dir: Path, tokenizer_dir: Path):
    """(tokenizer, model) as both lm-eval and the holdout task score them: a base model whose
    vocabulary lacks the template's marker tokens gets its embeddings resized, exactly as train did."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    return tok, model


def lm_eval_model(tok, model, batch_size: int):
    """lm-eval's HF wrapper around a model we loaded ourselves."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size)


def uses_chat_template(tok, label: str, requested: bool) -> bool:
    """eval.apply_chat_template, for a model whose tokenizer has a chat template: a base model
    evaluated with its own tokenizer may have none (a pretrained-only base), and lm-eval would
    fail on it; such a base is scored on the plain prompts, as lm-eval scores base models."""
    if requested and not getattr(tok, "chat_template", None):
        log.warning("The %s model's tokenizer has no chat template: evaluating it on plain prompts", label)
        return False
    return requested


def task_index(tasks: list[dict | str]):
    """lm-eval's task index, made once for every model (simple_evaluate would make its own for
    each). Indexing lm-eval's thousands of built-in task YAMLs takes about 10 s on 2 cores, and
    only a built-in task or a group needs it: lm-eval looks a group's members up by name there
    (and would turn a name it cannot find into an empty inline task), while a task config
    stands on its own."""
    from lm_eval.tasks import TaskManager

    needs_builtins = any(isinstance(task, str) or "group" in task for task in tasks)
    return TaskManager(include_defaults=needs_builtins, metadata={})  # metadata: as simple_evaluate's own


@contextmanager
def offline_hub_data(root: Path):
    """Within: the `datasets` library reads the built-in tasks' data from data/eval/ (download
    prepared it there) with the hub offline, and a task YAML's local files are prepared in a
    temporary cache (yielded), not in data/, which DVC versions. The variables are read when
    `datasets` is imported: the stage's own process imports it in here."""
    cache = (root / paths.EVAL_DATA).absolute()
    offline = {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    before = {key: os.environ.get(key) for key in offline}
    os.environ.update(offline)
    try:
        with tempfile.TemporaryDirectory(prefix="ftflow-eval-") as local_cache:
            yield Path(local_cache)
    finally:  # an in-process caller (a test) keeps its own environment
        for key, value in before.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def load_tasks(names: list[str], specs: list[dict | str], cfg: Eval, index, local_cache: Path, root: Path,
               leaves: dict | None = None) -> list:  # fmt: skip
    """Every configured task built by lm-eval (its data loaded), with eval.num_fewshot's count
    when that names it; a group stays one, for its aggregate score. A built-in task whose data
    is not in data/eval/ fails here, before any model is loaded, naming the task and the fix.
    `leaves` gets every single task by name (a group's members too)."""
    from datasets.exceptions import DatasetNotFoundError

    built = []
    for name, spec in zip(names, specs):
        kwargs = (spec.get("dataset_kwargs") or {}) if isinstance(spec, dict) else {}
        if kwargs.get("data_files"):  # a task YAML on local files: prepared outside data/
            spec = {**spec, "dataset_kwargs": {**kwargs, "cache_dir": str(local_cache)}}
        try:
            loaded = index.load([spec])
        except KeyError:
            shipped = sorted(p.stem for p in (root / TASKS_DIR).glob("*.yaml"))
            raise EvaluateError(
                f"eval task {name!r}: no {TASKS_DIR / name}.yaml and no lm-eval task, group or tag of that name "
                f"(task YAMLs here: {shipped}; lm-eval's own: `lm-eval ls tasks`)"
            ) from None
        except (ConnectionError, DatasetNotFoundError) as err:
            raise EvaluateError(not_downloaded(name, err)) from None
        if isinstance(cfg.num_fewshot, dict) and name in cfg.num_fewshot:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=cfg.num_fewshot[name])
        built += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
        if leaves is not None:
            leaves.update(loaded["tasks"])
    return built


def not_downloaded(task: str, err: Exception) -> str:
    return (
        f"eval task {task!r}: its data is not in {paths.EVAL_DATA}/ ({str(err).splitlines()[0]}). "
        "evaluate reads lm-eval's built-in tasks offline, from what download fetched: list the dataset "
        "the task reads in eval.datasets (its task YAML's dataset_path and dataset_name, e.g. "
        "{hub: openai/gsm8k, name: main}) and download it where there is internet: `ftflow download` with the "
        "same overrides, or the workflow itself (its download jobs run where Snakemake runs: the login node)"
    )


def run_lm_eval(lm, tasks: list, cfg: Eval, chat: bool, index=None) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=index,
        # one number overrides every task's own (but a task's explicit 0); per task: set by load_tasks
        num_fewshot=cfg.num_fewshot if isinstance(cfg.num_fewshot, int) else None,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        apply_chat_template=chat,
        gen_kwargs=None if cfg.max_gen_toks is None else {"max_gen_toks": cfg.max_gen_toks},
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        log_samples=True,
    )


def flat_scores(label: str, results: dict) -> dict[str, float]:
    """{"tuned/demo_words/exact_match": 0.97, "tuned/gsm8k/exact_match,strict-match": 0.41, ...}
    from lm-eval's nested results: one score per task, metric and filter."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if (
                metric in _NOT_SCORES
                or metric == "sample_len"
                or metric.endswith("_stderr")
                or not isinstance(value, (int, float))
            ):
                continue
            out[f"{label}/{task}/{score_name(metric, filter_name)}"] = value
    return out


def score_name(metric: str, filter_name: str) -> str:
    """A task without filters keeps the plain metric name (the keys of earlier runs, plots and
    tables stay valid); with filters (GSM8K: strict-match, flexible-extract) each one is its own
    score, named as lm-eval names it."""
    return metric if filter_name in ("", NO_FILTER) else f"{metric},{filter_name}"


def sample_lines(results: dict):
    """samples.jsonl: one line per logged sample and filter, as lm-eval logs them, with what the
    model generated (`raw`) beside what the filter kept and the metric scored (`response`); the
    document and prompt are left out (the task's data has them), which keeps lines short."""
    for task, samples in results.get("samples", {}).items():
        for s in samples:
            line = {"task": task, "doc_id": s.get("doc_id"), "filter": s.get("filter"), "target": s.get("target"),
                    "response": _single(s.get("filtered_resps")), "raw": _single([_single(r) for r in s.get("resps") or []])}  # fmt: skip
            yield json.dumps(_plain(line), default=str)


def _single(value):
    """A one-element list as its element: a generative task's single request and generation
    reads as the text; several (choices, repeats) stay a list."""
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def _plain(value):
    """Strict JSON: numpy scalars as numbers, a log-likelihood of -inf as the string "-inf"
    (json.dumps would write -Infinity, which JSON readers reject)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def evaluate(cfg: StageConfig, root: Path = Path(".")) -> dict:
    """Run the stage on its config (model, eval)."""
    model_cfg, eval_cfg = cfg.model, cfg.eval
    out_dir = root / paths.EVALUATE
    names = [name for name in eval_cfg.tasks if name != paths.HOLDOUT]  # lm-eval's; holdout is ours
    tasks = task_specs(names, root)
    metrics: dict[str, float] = {}
    models = models_to_evaluate(model_cfg, eval_cfg, root) if eval_cfg.tasks else {}
    with offline_hub_data(root) as local_cache:
        index, leaves = task_index(tasks) if tasks else None, {}
        # a task without its data fails here, before any model loads
        built = load_tasks(names, tasks, eval_cfg, index, local_cache, root, leaves) if tasks else None
        check_contamination(eval_cfg, leaves, root, out_dir)
        for label, (model_dir, tokenizer) in models.items():
            log.info("Evaluating the %s model <%s> (tokenizer <%s>) on %s", label, model_dir, tokenizer, eval_cfg.tasks)
            tok, model = (
                load_model(model_dir, tokenizer)
                if paths.HOLDOUT in eval_cfg.tasks or not vllm(eval_cfg)
                else (None, None)
            )
            if tasks:
                # lm-eval keeps a run's state in its tasks: the next model gets fresh ones
                built = built or load_tasks(names, tasks, eval_cfg, index, local_cache, root)
                results, built = lm_eval_scores(tok, model, model_dir, tokenizer, built, eval_cfg, label, index), None
                write_results(results, out_dir / label)
                metrics.update(flat_scores(label, results))
            if paths.HOLDOUT in eval_cfg.tasks:
                chat = uses_chat_template(tok, label, eval_cfg.apply_chat_template)
                ends = end_tokens(tok, model)
                scores = holdout.run(model, tok, chat, ends, root / paths.HOLDOUT_DATA, eval_cfg, out_dir / label)
                metrics.update({f"{label}/{paths.HOLDOUT}/{k}": v for k, v in scores.items()})
    for label in ("base", "tuned"):  # the rule's outputs, also when nothing is evaluated
        (out_dir / label).mkdir(parents=True, exist_ok=True)
    for key in [k for k in metrics if k.startswith("tuned/")]:
        base_key = "base/" + key.removeprefix("tuned/")
        if base_key in metrics:
            metrics["delta/" + key.removeprefix("tuned/")] = metrics[key] - metrics[base_key]
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (out_dir / "comparison.json").write_text(json.dumps(comparison(metrics), indent=2))
    table = comparison_table(metrics) if metrics else NOT_EVALUATED
    (out_dir / "comparison.md").write_text(table)
    # the model card to publish: consolidate's provenance card + these results (consolidate runs
    # before evaluate, so its own card cannot hold them)
    card = root / paths.CONSOLIDATE / "model" / "README.md"
    head = card.read_text() if card.exists() and not eval_cfg.models else "# Evaluation\n"
    (out_dir / "model_card.md").write_text(head + "\n## Evaluation\n\n" + table)
    (out_dir / "tasks.yaml").write_text(yaml.safe_dump([*tasks, *holdout_spec(eval_cfg)], sort_keys=False))
    write_stage_config(cfg.sections, out_dir)
    log.info("Scores:\n%s", table)
    return metrics


NOT_EVALUATED = "Not evaluated: eval.tasks is empty (eval=none).\n"


def check_contamination(eval_cfg: Eval, leaves: dict, root: Path, out_dir: Path) -> None:
    """contamination.json (per task: examples, how many occur in the training split) and
    contamination.jsonl (each such example with the training records it occurs in)."""
    c, train = eval_cfg.contamination, root / paths.NORMALIZE / "train.parquet"
    examples = example_texts(eval_cfg, leaves, root) if c.check and train.exists() else {}
    texts = {task: [text for _, text in items] for task, items in examples.items()}
    ids = {task: [i for i, _ in items] for task, items in examples.items()}
    summary, lines = contamination.check(texts, train, c.ngram, c.flag_above, ids)
    summary["checked"] = bool(texts)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "contamination.json").write_text(json.dumps(summary, indent=2))
    with (out_dir / "contamination.jsonl").open("w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    for task, t in summary["tasks"].items():
        log.info("contamination: %s: %d of %d examples occur in the training data (%d whole)", task, t["ngram"],
                 t["examples"], t["exact"])  # fmt: skip
        if t["flagged"]:
            log.warning("contamination: %d of %d %s examples also occur in the training data (%d whole); see "
                        "%s/contamination.jsonl", t["ngram"], t["examples"], task, t["exact"], paths.EVALUATE)  # fmt: skip


def example_texts(eval_cfg: Eval, leaves: dict, root: Path) -> dict[str, list[tuple]]:
    """Each task's examples as (id, text), as many as it scores (eval.limit): the holdout task's
    whole conversations (by record id), an lm-eval task's prompt and answer (by doc id, as in
    samples.jsonl)."""
    out = {}
    if paths.HOLDOUT in eval_cfg.tasks:
        out[paths.HOLDOUT] = [(ex.id, " ".join([*(m.get("content") or "" for m in ex.prompt), ex.reference]))
                              for ex in holdout.examples(root / paths.HOLDOUT_DATA, eval_cfg.limit)]  # fmt: skip
    for name, task in leaves.items():
        docs = list(task.eval_docs)[: eval_cfg.limit]
        out[name] = [(i, f"{task.doc_to_text(doc)} {answer_text(task, doc)}") for i, doc in enumerate(docs)]
    return out


def answer_text(task, doc) -> str:
    """A document's answer as text (a multiple-choice target is an index into its choices)."""
    target = task.doc_to_target(doc)
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        choices = task.doc_to_choice(doc)
        return str(choices[target]) if 0 <= target < len(choices) else ""
    return " ".join(map(str, target)) if isinstance(target, list) else str(target)


def vllm(eval_cfg: Eval) -> bool:
    return eval_backend(eval_cfg.backend) == "vllm"


def lm_eval_scores(
    tok, model, model_dir: Path, tokenizer: Path, built: list, eval_cfg: Eval, label: str, index
) -> dict:
    """lm-eval's results for one model, on the HF model already loaded or on vLLM."""
    if vllm(eval_cfg):
        lm = load_vllm(model_dir, tokenizer, eval_cfg)
        chat = uses_chat_template(lm.tokenizer, label, eval_cfg.apply_chat_template)
    else:
        lm = lm_eval_model(tok, model, eval_cfg.batch_size)
        chat = uses_chat_template(tok, label, eval_cfg.apply_chat_template)
    return run_lm_eval(lm, built, eval_cfg, chat, index)


def end_tokens(tok, model) -> set[int]:
    """Where an answer ends: the model's generation-config eos ids (consolidate sets the
    template's end-of-turn token there) and its tokenizer's eos."""
    from ftflow.chat import end_tokens as generation_ends

    return generation_ends(model) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def holdout_spec(eval_cfg: Eval) -> list[dict]:
    """tasks.yaml's entry for the holdout task: what it read and how it scored."""
    if paths.HOLDOUT not in eval_cfg.tasks:
        return []
    return [{"task": paths.HOLDOUT, "data": paths.HOLDOUT_DATA, "metrics": list(holdout.METRICS),
             "max_gen_toks": eval_cfg.max_gen_toks, "limit": eval_cfg.limit, "generation": "greedy"}]  # fmt: skip


def write_results(results: dict, out: Path) -> None:
    """lm-eval's results.json (without the samples) and samples.jsonl, for one model."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(results, drop="samples"), indent=2, default=str))
    with (out / "samples.jsonl").open("w") as f:
        f.writelines(line + "\n" for line in sample_lines(results))


def models_to_evaluate(model_cfg: Model, eval_cfg: Eval, root: Path) -> dict[str, tuple[Path, Path]]:
    """label -> (model directory, tokenizer directory)."""
    if eval_cfg.models:
        out = {}
        for label, folder in eval_cfg.models.items():
            path = Path(folder) if Path(folder).is_absolute() else root / folder
            if not (path / "config.json").exists():
                raise EvaluateError(
                    f"eval.models.{label}: {path} is not a Hugging Face model directory (no config.json)"
                )
            out[label] = (path, path)  # a model directory carries its own tokenizer
        return out
    tuned = root / paths.CONSOLIDATE / "model"  # consolidate saved the tokenizer it trained with there
    return {
        "base": (root / paths.base_model_dir(model_cfg.model_dump()), base_tokenizer(model_cfg, root)),
        "tuned": (tuned, tuned),
    }


def base_tokenizer(model_cfg: Model, root: Path) -> Path:
    """The base model is scored as it ships: with its own tokenizer and chat template when its
    directory has a tokenizer (hub and local models), not with the pipeline's template, which
    it was never trained on. A scratch model has no tokenizer of its own (train initialised it
    for pack's, and copies that beside it): it gets pack's."""
    base = root / paths.base_model_dir(model_cfg.model_dump())
    if model_cfg.source != "scratch" and any((base / name).exists() for name in TOKENIZER_FILES):
        return base
    return root / paths.PACK / "tokenizer"


def comparison_table(metrics: dict[str, float]) -> str:
    """One markdown table: a row per task and metric, a column per model (+ delta)."""
    labels = list(dict.fromkeys(k.split("/", 1)[0] for k in metrics))
    scores = sorted({k.split("/", 1)[1] for k in metrics})
    lines = ["| task / metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for score in scores:
        cells = [f"{metrics[f'{m}/{score}']:+.4f}" if m == "delta" and f"{m}/{score}" in metrics
                 else f"{metrics[f'{m}/{score}']:.4f}" if f"{m}/{score}" in metrics else "" for m in labels]  # fmt: skip
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison(metrics: dict[str, float]) -> list[dict]:
    """Base and tuned side by side, one row per model and score: the data of the eval plot
    (`dvc plots show`, and across experiments `dvc plots diff`)."""
    rows = []
    for key, value in sorted(metrics.items()):
        model, score = key.split("/", 1)
        if model in ("base", "tuned"):
            rows.append({"score": score, "model": model, "value": value})
    return rows


def _json_safe(results: dict, drop: str) -> dict:
    return {k: v for k, v in results.items() if k != drop}
