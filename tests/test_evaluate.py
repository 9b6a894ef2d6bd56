"""evaluate's task loading, metric flattening and tokenizer choice, and a real lm-eval run of a
task with several filters on the smoke run's models (the stage in the DAG is in test_workflow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ftflow import runner
from ftflow.evaluate import flat_scores, task_config
from ftflow.holdout import METRICS as HOLDOUT_METRICS
from ftflow.workflow.inputs import task_data_files

from helpers import REPO, ftflow


def test_shipped_task_resolves_its_data_files_against_the_root(tmp_path):
    task = task_config("demo_words", REPO)
    assert task["task"] == "demo_words" and task["output_type"] == "generate_until"
    assert task["dataset_kwargs"]["data_files"]["test"] == str(REPO / "examples/demo/test.jsonl")
    assert task_data_files(["demo_words"], REPO) == ["examples/demo/test.jsonl"]


def test_unknown_task_lists_the_shipped_ones():
    shipped = r"\['demo_words', 'demo_words_choice', 'sms_spam', 'sms_spam_choice'\]"
    with pytest.raises(FileNotFoundError, match=rf"eval task 'nope'.*shipped tasks: {shipped}"):
        task_config("nope", REPO)


def test_only_a_group_indexes_lm_evals_builtin_tasks():
    """A task config stands alone, so evaluate skips lm-eval's ~10 s index of its built-in tasks;
    a group names its members, which may be built-in tasks, so it gets the whole index."""
    from ftflow.evaluate import task_index

    assert task_index([task_config("demo_words", REPO)]).all_tasks == []
    group = {"group": "reasoning", "task": ["arc_easy", "demo_words"]}
    assert "arc_easy" in task_index([task_config("demo_words", REPO), group]).all_tasks


def test_flat_scores_drop_stderr_and_bookkeeping():
    results = {
        "results": {"t": {"alias": "t", "exact_match,none": 0.5, "exact_match_stderr,none": 0.1, "sample_len": 8}}
    }
    assert flat_scores("tuned", results) == {"tuned/t/exact_match": 0.5}


def test_flat_scores_keep_every_filter_of_a_task():
    """lm-eval's results for a GSM8K-style task (two filters) beside a task without filters."""
    results = {"results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.02,
                  "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.03},
        "demo_words_choice": {"alias": "demo_words_choice", "acc,none": 0.75, "acc_stderr,none": "N/A", "acc_norm,none": 1.0},
    }}  # fmt: skip
    assert flat_scores("base", results) == {
        "base/gsm8k/exact_match,strict-match": 0.25,
        "base/gsm8k/exact_match,flexible-extract": 0.5,
        "base/demo_words_choice/acc": 0.75,
        "base/demo_words_choice/acc_norm": 1.0,
    }


def test_samples_keep_raw_and_filtered_responses_as_strict_json():
    from ftflow.evaluate import sample_lines

    results = {"samples": {
        "gsm8k": [{"doc_id": 3, "doc": {"question": "long"}, "target": "#### 7", "filter": "strict-match",
                   "resps": [["So 3 + 4 = 7.\n#### 7"]], "filtered_resps": ["7"], "arguments": [["prompt"]]}],
        "choice": [{"doc_id": 0, "target": 1, "filter": "none", "resps": [[(-1.5, False)], [(float("-inf"), True)]],
                    "filtered_resps": [(-1.5, False), (float("-inf"), True)]}],
    }}  # fmt: skip
    lines = [json.loads(line, parse_constant=pytest.fail) for line in sample_lines(results)]  # -Infinity: not JSON
    assert lines == [
        {"task": "gsm8k", "doc_id": 3, "filter": "strict-match", "target": "#### 7", "response": "7", "raw": "So 3 + 4 = 7.\n#### 7"},
        {"task": "choice", "doc_id": 0, "filter": "none", "target": 1,
         "response": [[-1.5, False], ["-inf", True]], "raw": [[-1.5, False], ["-inf", True]]},
    ]  # fmt: skip


def test_base_with_a_smaller_vocabulary_is_resized_like_train_does(tmp_path):
    """A hub base without the template's marker tokens: pack added them, train resized the
    embeddings, and the base evaluation must accept the same token ids."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ftflow.evaluate import load_model

    vocab = {f"w{i}": i for i in range(40)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), unk_token="w0")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(tmp_path / "tok")
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    _, model = load_model(tmp_path / "base", tmp_path / "tok")
    assert model.get_input_embeddings().num_embeddings == len(tok) == 42


def test_vllm_backend_without_vllm_is_a_clear_error():
    from ftflow.evaluate import EvaluateError, eval_backend

    assert eval_backend("auto") == "hf"  # no vLLM / GPU here
    with pytest.raises(EvaluateError, match=r"eval.backend=vllm needs vLLM installed .* use eval.backend=hf"):
        eval_backend("vllm")


def small_model(folder: Path, tokenizer: bool, chat_template: str | None = None) -> None:
    """A real Hugging Face model directory (a one-layer Llama), with or without tokenizer files."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(folder)  # fmt: skip
    if tokenizer:
        raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0"))
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", eos_token="w1")
        tok.chat_template = chat_template
        tok.save_pretrained(folder)


def test_base_is_evaluated_with_its_own_tokenizer_when_it_has_one(tmp_path):
    """A hub/local base ships its tokenizer and chat template: it is scored with them, not with
    pack's (the pipeline's template, which it never saw). Without tokenizer files, and for a
    scratch model (whose tokenizer pack trained), pack's tokenizer it is."""
    from ftflow.config.schema import Eval, Model
    from ftflow.evaluate import models_to_evaluate

    hub = Model(name="hub_model", source="hub", hub_id="org/hub-model")
    scratch = Model(name="tiny", source="scratch", architecture={"model_type": "llama"})
    base, pack = tmp_path / "data/models/hub_model", tmp_path / "results/pack/tokenizer"
    tuned = tmp_path / "results/consolidate/model"
    small_model(base, tokenizer=True, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    small_model(tmp_path / "results/train/init", tokenizer=True)  # train copies pack's tokenizer beside a scratch init
    eval_cfg = Eval(tasks=["demo_words"])
    assert models_to_evaluate(hub, eval_cfg, tmp_path) == {"base": (base, base), "tuned": (tuned, tuned)}
    assert models_to_evaluate(scratch, eval_cfg, tmp_path)["base"] == (tmp_path / "results/train/init", pack)

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    assert models_to_evaluate(hub, eval_cfg, tmp_path)["base"] == (base, pack)


def test_a_base_without_a_chat_template_is_scored_on_plain_prompts(tmp_path, caplog):
    """lm-eval fails on apply_chat_template with a tokenizer that has no template (a
    pretrained-only base, now evaluated with its own tokenizer)."""
    from ftflow.evaluate import load_model, uses_chat_template

    small_model(tmp_path / "plain", tokenizer=True)
    small_model(
        tmp_path / "chat", tokenizer=True, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    plain, chat = (load_model(tmp_path / name, tmp_path / name)[0] for name in ("plain", "chat"))
    assert uses_chat_template(chat, "tuned", True) and not uses_chat_template(chat, "tuned", False)
    assert not uses_chat_template(plain, "base", True)
    assert "The base model's tokenizer has no chat template: evaluating it on plain prompts" in caplog.text


# a GSM8K-style task over the demo's held-out records: the same generations, scored through two
# filters (lm-eval's `filter_list`, the syntax of its gsm8k.yaml)
FILTERS = [
    {"name": "strict-match",  # the answer is one word and nothing else
     "filter": [{"function": "regex", "regex_pattern": r"^\s*(\w+)\s*$"}, {"function": "take_first"}]},
    {"name": "flexible-extract",  # the last word of whatever the model said
     "filter": [{"function": "regex", "regex_pattern": r"(\w+)", "group_select": -1}, {"function": "take_first"}]},
]  # fmt: skip
FILTER_PATTERNS = {"strict-match": (r"^\s*(\w+)\s*$", 0), "flexible-extract": (r"(\w+)", -1)}


@pytest.fixture(scope="module")
def filtered_eval(finished, tmp_path_factory) -> Path:
    """evaluate on the finished smoke run's base and tuned models with the filtered task (and
    demo_words, unfiltered, and the holdout task on the same test records), in a tree of its own:
    the finished run's outputs stay as they were."""
    from ftflow.config.params import compose, stage_params

    root = tmp_path_factory.mktemp("filtered") / "repo"
    for part in ("results/train", "results/pack", "results/consolidate", "results/normalize", "examples"):
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).symlink_to(finished / part)
    task = {
        **yaml.safe_load((REPO / "conf/eval/tasks/demo_words.yaml").read_text()),
        "task": "demo_words_extract",
        "filter_list": FILTERS,
    }
    (root / "conf/eval/tasks").mkdir(parents=True)
    for name, text in (
        ("demo_words_extract", yaml.safe_dump(task)),
        ("demo_words", (REPO / "conf/eval/tasks/demo_words.yaml").read_text()),
    ):
        (root / f"conf/eval/tasks/{name}.yaml").write_text(text)
    cfg = stage_params(
        compose(
            ["experiment=smoke", "eval.tasks=[demo_words,demo_words_extract,holdout]", "eval.limit=4"],
            finished / "conf",
        ),  # fmt: skip
        "evaluate",
    )
    runner.run("evaluate", cfg, root)
    return root / "results/eval"


@pytest.mark.slow
def test_every_filter_of_a_task_is_a_score_everywhere(filtered_eval):
    from ftflow.report import eval_table

    metrics = json.loads((filtered_eval / "metrics.json").read_text())
    scores = [
        "demo_words/exact_match",
        "demo_words_extract/exact_match,strict-match",
        "demo_words_extract/exact_match,flexible-extract",
    ]
    scores += [f"holdout/{metric}" for metric in HOLDOUT_METRICS]
    assert set(metrics) == {f"{m}/{s}" for m in ("base", "tuned", "delta") for s in scores}
    for label in ("base", "tuned"):  # each filter's own score, as lm-eval computed it
        results = json.loads((filtered_eval / label / "results.json").read_text())["results"]
        for name in FILTER_PATTERNS:
            assert (
                metrics[f"{label}/demo_words_extract/exact_match,{name}"]
                == results["demo_words_extract"][f"exact_match,{name}"]
            )
        assert metrics[f"{label}/demo_words/exact_match"] == results["demo_words"]["exact_match,none"]
    table, card = (filtered_eval / "comparison.md").read_text(), (filtered_eval / "model_card.md").read_text()
    for score in scores:
        base, tuned = metrics[f"base/{score}"], metrics[f"tuned/{score}"]
        row = f"| {score} | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} |"
        assert row in table and row in card
    comparison = json.loads((filtered_eval / "comparison.json").read_text())
    assert {(r["score"], r["model"]) for r in comparison} == {(s, m) for s in scores for m in ("base", "tuned")}
    shown = {(task, metric) for task, metric, *_ in eval_table(comparison).rows}  # the report's eval section
    assert shown == {tuple(s.split("/")) for s in scores}


@pytest.mark.slow
def test_the_holdout_task_answers_the_test_split_and_scores_it_like_lm_eval(filtered_eval):
    """The holdout task on the demo's test records, beside lm-eval's demo_words on the same
    records: the same greedy answers through the same chat template, so the same exact match;
    each answer beside its reference; the reference loss equal to the model's own loss on it."""
    import torch
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = json.loads((filtered_eval / "metrics.json").read_text())
    raw = [json.loads(line) for line in (REPO / "examples/demo/test.jsonl").read_text().splitlines()[:4]]
    for label in ("base", "tuned"):
        lines = [json.loads(line) for line in (filtered_eval / label / "holdout.jsonl").read_text().splitlines()]
        assert [line["reference"] for line in lines] == [r["output"] for r in raw]
        assert all(r["instruction"] in line["prompt"][-1]["content"] and r["input"] in line["prompt"][-1]["content"]
                   for line, r in zip(lines, raw))  # fmt: skip
        answers, refs = [line["answer"] for line in lines], [line["reference"] for line in lines]
        assert metrics[f"{label}/holdout/exact_match"] == sum(a == r for a, r in zip(answers, refs)) / 4
        assert metrics[f"{label}/holdout/exact_match"] == metrics[f"{label}/demo_words/exact_match"]
        rouge = rouge_scorer.RougeScorer(["rougeL"])
        assert metrics[f"{label}/holdout/rougeL"] == pytest.approx(
            sum(rouge.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, refs)) / 4)  # fmt: skip
        assert metrics[f"{label}/holdout/chrf"] == pytest.approx(CHRF().corpus_score(answers, [refs]).score)
    assert metrics["tuned/holdout/loss"] < metrics["base/holdout/loss"]  # trained on the same task

    # the tuned model's loss on the reference turns, computed here with the model's own loss
    model_dir = filtered_eval.parents[1] / "results/consolidate/model"
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    total = count = 0
    tuned = [json.loads(line) for line in (filtered_eval / "tuned/holdout.jsonl").read_text().splitlines()]
    for r, line in zip(raw, tuned):
        prompt = line["prompt"]
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": r["output"]}], return_dict=True)
        full = full["input_ids"]
        end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), len(p)) + 1
        labels = torch.tensor([[-100] * len(p) + full[len(p) : end]])
        with torch.no_grad():
            n = end - len(p)
            total += model(torch.tensor([full[:end]]), labels=labels).loss.item() * n
            count += n
    assert metrics["tuned/holdout/loss"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.slow
def test_samples_have_each_filters_response_beside_the_raw_generation(filtered_eval):
    for label in ("base", "tuned"):
        lines = [json.loads(line) for line in (filtered_eval / label / "samples.jsonl").read_text().splitlines()]
        extract = [s for s in lines if s["task"] == "demo_words_extract"]
        assert sorted((s["doc_id"], s["filter"]) for s in extract) == [
            (d, f) for d in range(4) for f in sorted(FILTER_PATTERNS)
        ]
        assert all(s["filter"] == "none" for s in lines if s["task"] == "demo_words")
        for s in extract:  # the filtered response is the filter applied to the raw generation
            pattern, group = FILTER_PATTERNS[s["filter"]]
            found = re.findall(pattern, s["raw"])
            assert isinstance(s["raw"], str) and s["response"] == (found[group] if found else "[invalid]")
            assert (
                s["target"]
                == json.loads((REPO / "examples/demo/test.jsonl").read_text().splitlines()[s["doc_id"]])["output"]
            )


def test_the_standard_suites_datasets_are_what_its_tasks_read():
    """conf/eval/standard.yaml lists the hub data its lm-eval tasks read: the dataset_path and
    dataset_name of each task's YAML in the installed lm-eval (a new lm-eval moving a dataset
    fails here, not on a compute node)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from ftflow.config.params import compose

    suite = compose(["eval=standard"], REPO / "conf")["eval"]  # composes and validates
    index = TaskManager(include_defaults=True, metadata={}).task_index
    read = set()
    for name in suite["tasks"]:
        task = load_yaml(index[name].yaml_path, resolve_func=False)
        read.add((task["dataset_path"], task.get("dataset_name")))
    assert {(d["hub"], d.get("name")) for d in suite["datasets"]} == read
    assert set(suite["num_fewshot"]) <= set(suite["tasks"])


@pytest.mark.slow
def test_a_builtin_task_runs_offline_on_the_data_download_fetched(finished, tmp_path):
    """The workflow with lm-eval's own gsm8k beside the demo task (local files) and a task YAML
    of the user's on the same hub data: the download job fetches the data from the hub (a
    stand-in on the loopback), then, with the hub gone, evaluate runs the three on it and
    nothing upstream of evaluate reruns."""
    from lm_eval.tasks import TaskManager

    from helpers import clone, job_stats
    from helpers.hub import HubStandIn, published

    rows = [{"question": f"What is {i} plus 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(4)]
    root = clone(finished, tmp_path / "repo")
    gsm8k = yaml.safe_load(TaskManager(include_defaults=True).task_index["gsm8k"].yaml_path.read_text())
    (root / "conf/eval/tasks/my_gsm8k.yaml").write_text(yaml.safe_dump({**gsm8k, "task": "my_gsm8k", "tag": []}))
    run = ["run", "experiment=smoke", "eval.tasks=[demo_words,gsm8k,my_gsm8k]", "eval.limit=3", "eval.max_gen_toks=8",
           "eval.datasets=[{hub: openai/gsm8k, name: main}]", "eval.num_fewshot={gsm8k: 2, my_gsm8k: 1}"]  # fmt: skip
    hub = HubStandIn("openai/gsm8k", published({"main": {"train": rows, "test": rows}}))
    try:
        online = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
        fetched = ftflow(*run, "--", "data/manifests/eval/openai--gsm8k--main.json", cwd=root, env_extra=online)
    finally:
        hub.close()
    assert job_stats(fetched.stderr) == {"download_eval": 1}, fetched.stderr[-3000:]
    gone = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "empty")}
    done = ftflow(*run, cwd=root, env_extra=gone)
    assert job_stats(done.stderr) == {"evaluate": 1, "report": 1, "all": 1}, done.stderr[-3000:]
    metrics = json.loads((root / "results/eval/metrics.json").read_text())
    for label in ("base", "tuned"):
        assert {f"{label}/{t}/exact_match,strict-match" for t in ("gsm8k", "my_gsm8k")} <= set(metrics)
        assert f"{label}/demo_words/exact_match" in metrics
        results = json.loads((root / f"results/eval/{label}/results.json").read_text())
        assert results["n-samples"]["gsm8k"] == {"original": 4, "effective": 3}
        assert results["configs"]["gsm8k"]["num_fewshot"] == 2 and results["configs"]["my_gsm8k"]["num_fewshot"] == 1
    samples = [json.loads(line) for line in (root / "results/eval/tuned/samples.jsonl").read_text().splitlines()]
    assert {s["target"] for s in samples if s["task"] == "gsm8k"} == {r["answer"] for r in rows[:3]}


@pytest.mark.slow
def test_a_task_without_its_data_fails_naming_the_task_and_the_download(finished):
    """evaluate reads lm-eval's built-in tasks offline only: one whose data was not downloaded
    fails before any model loads, naming the task and what to run; an unknown name says so."""
    for tasks, says in (
        ("[demo_words,arc_easy]", "eval task 'arc_easy': its data is not in data/eval/ ("),
        ("[demo_wrods]", "eval task 'demo_wrods': no conf/eval/tasks/demo_wrods.yaml and no lm-eval task"),
    ):
        proc = ftflow("evaluate", "experiment=smoke", f"eval.tasks={tasks}", cwd=finished, check=False)
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        if "arc_easy" in tasks:
            assert "eval.datasets" in proc.stderr and "`ftflow download`" in proc.stderr
