"""The train stage for real: TRL's SFT/DPO/KTO/GRPO trainers on a tiny model on CPU, the DDP and
DeepSpeed ZeRO-3 launchers on 2 processes (gloo), resume after SIGKILL, checkpoint on SIGUSR1,
and no secret in anything a run writes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from ftflow import paths
from ftflow.config.params import compose
from ftflow.train import curve
from ftflow.train.checkpoints import COMPLETE, damage, saved_bytes

from helpers import (
    BIN,
    REPO,
    SMALL_SFT,
    clone,
    env,
    ftflow,
    job_stats,
    prepared,
    small_file_system,
    start_stage,
    wait_for_checkpoint,
)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    return prepared(tmp_path_factory.mktemp("sft") / "repo", SMALL_SFT)


def losses(root: Path) -> list[float]:
    return [v for _, v in curve.series(curve.read(root / paths.TRAIN / "loss.csv"), "train", "loss")]


def summary(root: Path) -> dict:
    return json.loads((root / paths.TRAIN / "summary.json").read_text())


def weights(root: Path) -> dict[str, torch.Tensor]:
    model = root / paths.TRAIN / "model"
    name = "adapter_model.safetensors" if (model / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(model / name)


def falls(curve: list[float]) -> bool:
    """The last quarter of a loss curve is clearly below its first quarter."""
    q = max(1, len(curve) // 4)
    return sum(curve[-q:]) / q < 0.9 * sum(curve[:q]) / q


# --- each trainer -----------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_full_fine_tuning_learns_and_loads(conversations, tmp_path):
    from transformers import AutoModelForCausalLM

    root = clone(conversations, tmp_path / "repo")
    ftflow("train", *SMALL_SFT, "train.max_steps=16", "train.save_steps=8", cwd=root)
    curve = losses(root)
    assert len(curve) == 16 and falls(curve), curve
    s = summary(root)
    assert s["method"] == "sft" and s["steps"] == 16
    model = AutoModelForCausalLM.from_pretrained(root / paths.TRAIN / "model")
    init = load_file(root / paths.TRAIN / "init" / "model.safetensors")
    assert s["trainable_params"] == model.num_parameters() == sum(t.numel() for t in init.values())


@pytest.mark.slow
def test_dpo_with_lora_prefers_the_chosen_answers(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    overrides = ["train=dpo", "peft=lora", "+data.sources.0.limit=16", "pack.max_length=128", "tracking=none",
                 "train.logging_steps=1", "train.max_steps=12", "train.learning_rate=5e-3", "train.save_steps=100"]  # fmt: skip
    root = prepared(tmp_path / "repo", overrides)
    ftflow("train", *overrides, cwd=root)
    curve = losses(root)
    # DPO's loss starts at ln 2 (policy = reference) and falls as chosen answers gain on rejected
    assert abs(curve[0] - 0.6931) < 1e-3 and falls(curve), curve
    state = json.loads(next((root / paths.CHECKPOINTS).glob("*/checkpoint-12/trainer_state.json")).read_text())
    assert state["log_history"][-2]["rewards/accuracies"] > 0.5
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / paths.TRAIN / "init"),
                                      root / paths.TRAIN / "model")  # fmt: skip
    assert any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_kto_full_fine_tuning_trains(tmp_path):
    overrides = ["train=kto", "+data.sources.0.limit=16", "pack.max_length=128", "tracking=none",
                 "train.logging_steps=1", "train.max_steps=12", "train.learning_rate=1e-3", "train.save_steps=100"]  # fmt: skip
    root = prepared(tmp_path / "repo", overrides)
    ftflow("train", *overrides, cwd=root)
    curve = losses(root)
    assert abs(curve[0] - 0.5) < 0.05 and falls(curve), curve  # KTO's loss starts at 0.5 (policy = reference)
    assert summary(root)["method"] == "kto"


@pytest.mark.slow
def test_grpo_samples_rewards_and_updates(tmp_path):
    overrides = ["train=grpo", "+data.sources.0.limit=64", "pack.max_length=128", "tracking=none",
                 "train.logging_steps=1", "train.max_steps=3", "train.save_steps=100", "train.learning_rate=1e-3",
                 "train.grpo.max_completion_length=6", "train.grpo.num_generations=4",
                 "train.grpo.rewards=[{name:exact_match},{name:regex_match,pattern:'(\\w+)'},{name:'my_rewards.py:short'}]"]  # fmt: skip
    root = prepared(tmp_path / "repo", overrides[:-1])
    # a user reward beside the train configs: favours completions of fewer characters (random
    # tokens differ in length, so the rewards in a group differ from the start)
    (root / "conf/train/my_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [-len(c) / 50 for c in completions]\n"
    )
    ftflow("train", *overrides, cwd=root)
    state = json.loads(next((root / paths.CHECKPOINTS).glob("*/checkpoint-3/trainer_state.json")).read_text())
    logged = state["log_history"][0]
    assert {"rewards/exact_match/mean", "rewards/regex_match/mean", "rewards/short/mean"} <= set(logged)
    assert 0 < logged["completions/mean_length"] <= 6 and logged["rewards/short/std"] > 0
    init = load_file(root / paths.TRAIN / "init" / "model.safetensors")
    tuned = weights(root)
    # the rewards differ within groups: non-zero advantages moved the weights
    assert any(not torch.equal(init[k], tuned[k]) for k in init)


def test_qlora_without_4bit_kernels_for_the_device_is_a_clear_error(conversations, tmp_path):
    """A bitsandbytes with 4-bit kernels for CUDA only (a stand-in package of that
    kind first on the path) on a machine without a GPU: train stops before launching, saying what
    is missing and what to use instead. (QLoRA itself runs: tests/train/test_qlora.py.)"""
    root = clone(conversations, tmp_path / "repo")
    (tmp_path / "cuda_only" / "bitsandbytes").mkdir(parents=True)
    (tmp_path / "cuda_only" / "bitsandbytes" / "__init__.py").write_text('supported_torch_devices = {"cuda"}\n')
    proc = ftflow("train", *SMALL_SFT, "peft=qlora", "train.max_steps=1", cwd=root, check=False,
                  env_extra={"PYTHONPATH": str(tmp_path / "cuda_only")})  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "peft=qlora: the installed bitsandbytes has no 4-bit kernels for cpu (only for cuda)" in proc.stderr
    assert "use peft=lora on this machine, or bitsandbytes>=0.50" in proc.stderr
    assert not (root / paths.TRAIN / "model").exists()


# --- launchers: 2 processes over gloo -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "zero3"])
def test_two_process_launchers_train_and_save_a_loadable_model(conversations, tmp_path, launcher):
    """DDP saves full weights; ZeRO-3 leaves one parameter shard per process, which consolidate
    gathers with DeepSpeed's zero_to_fp32 into a plain model and checks against the logits the
    trained (sharded) model recorded."""
    from transformers import AutoModelForCausalLM

    root = clone(conversations, tmp_path / "repo")
    ftflow("train", *SMALL_SFT, f"launcher={launcher}", "train.max_steps=12", "train.save_steps=6", cwd=root)
    assert sorted(p.name for p in (root / paths.WORKERS).iterdir()) == ["0.json", "0.pid", "1.json", "1.pid"]
    curve = losses(root)
    assert len(curve) == 12 and falls(curve), curve
    model_dir = root / paths.TRAIN / "model"
    if launcher == "zero3":
        for folder in (model_dir, next((root / paths.CHECKPOINTS).glob("*/checkpoint-12"))):
            shards = sorted(p.name for p in folder.rglob("*model_states.pt"))
            assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
        assert not list(model_dir.glob("*.safetensors"))  # nothing gathered into one process
        ftflow("consolidate", *SMALL_SFT, f"launcher={launcher}", cwd=root)
        check = json.loads((root / paths.CONSOLIDATE / "verification.json").read_text())
        assert check["ok"] and check["max_abs_logprob_diff"] < 1e-4 and check["argmax_agree"] == 1.0, check
        model_dir = root / paths.CONSOLIDATE / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    init = load_file(root / paths.TRAIN / "init" / "model.safetensors")
    assert model.num_parameters() == sum(t.numel() for t in init.values())
    assert summary(root)["trainable_params"] == model.num_parameters()
    tuned = model.state_dict()
    assert any(not torch.equal(init[k], tuned[k]) for k in init)


# --- interruptions ----------------------------------------------------------------------------------

KILL = [*SMALL_SFT, "train.max_steps=24", "train.save_steps=2", "train.save_total_limit=2", "train.warmup_steps=2"]


@pytest.mark.slow
def test_killed_three_times_resumes_to_the_same_weights(conversations, tmp_path):
    """SIGKILL (no chance to save) at three points; each rerun resumes from the last complete
    checkpoint, and the final weights and loss curve are bitwise those of an uninterrupted run:
    on CPU every step is deterministic, and the checkpoint restores model, optimizer, scheduler,
    RNG states and the data order (the sampler's epoch seed plus the batches already seen)."""
    straight = clone(conversations, tmp_path / "straight")
    ftflow("train", *KILL, cwd=straight)

    root = clone(conversations, tmp_path / "killed")
    resumed = []
    for step in (2, 8, 14):
        proc = start_stage(root, KILL)
        wait_for_checkpoint(root, step, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        last = max(int(p.name.split("-")[1]) for p in (root / paths.CHECKPOINTS).glob("*/checkpoint-*"))
        resumed.append(last)
    ftflow("train", *KILL, cwd=root)
    s = summary(root)
    assert s["steps"] == 24 and s["resumed_from"] is not None
    first = summary(straight)
    assert first["resumed_from"] is None
    # each kill came later than the one before and before the end
    assert resumed == sorted(resumed) and resumed[0] >= 2 and resumed[-1] < 24, resumed
    a, b = weights(straight), weights(root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(root) == losses(straight)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_dropped_and_the_run_resumes_from_the_one_before(conversations, tmp_path):
    """The last checkpoint's weights changed on disk after it was saved (a byte flipped: same
    size, found by train.checkpoint_verify=sha256), or its optimizer state cut short (found by
    the size check every resume makes): the rerun says which file and why, removes it, resumes
    from the checkpoint before, and ends with the uninterrupted run's weights, bitwise."""
    straight = clone(conversations, tmp_path / "straight")
    ftflow("train", *KILL, "train.checkpoint_verify=sha256", cwd=straight)
    (ckpt_dir,) = (straight / paths.CHECKPOINTS).iterdir()
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint-*")) == ["checkpoint-22", "checkpoint-24"]

    def damaged(name: str, file: str, change, verify: str) -> str:
        root = clone(straight, tmp_path / name)
        path = root / paths.CHECKPOINTS / ckpt_dir.name / "checkpoint-24" / file
        data = bytearray(path.read_bytes())
        path.write_bytes(change(data))
        start = time.time()
        proc = ftflow("train", *KILL, f"train.checkpoint_verify={verify}", cwd=root)
        assert time.time() - start < 120  # found before the processes start; two steps trained
        assert summary(root)["resumed_from"] == "checkpoint-22" and summary(root)["steps"] == 24
        a, b = weights(straight), weights(root)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert losses(root) == losses(straight)
        return proc.stderr

    def flip(data: bytearray) -> bytes:
        data[len(data) // 2] ^= 0xFF
        return bytes(data)

    log = damaged("flipped", "model.safetensors", flip, "sha256")
    assert re.search(r"checkpoint-24 is damaged: model.safetensors is not the file that was saved \(its sha256 "
                     r"differs\)\. Removed it; resuming from checkpoint-22\.", log), log[-3000:]  # fmt: skip
    log = damaged("cut", "optimizer.pt", lambda data: bytes(data[:-1024]), "size")
    size = (ckpt_dir / "checkpoint-24" / "optimizer.pt").stat().st_size
    assert f"checkpoint-24 is damaged: optimizer.pt has {size - 1024} bytes, {size} when it was saved" in log


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_the_rerun_resumes(conversations, tmp_path):
    """The checkpoints' file system (a tmpfs mounted by the test, as root) has room for two and a
    half checkpoints; with save_total_limit=2 the third save runs out of space before the oldest
    is rotated away. The stage fails at that save saying how much a checkpoint takes and how
    much was free, removes the cut checkpoint, keeps the one before whole, and the rerun (with
    room again) resumes from it to the uninterrupted run's weights, bitwise."""
    straight = clone(conversations, tmp_path / "straight")
    ftflow("train", *KILL, cwd=straight)
    (done,) = (straight / paths.CHECKPOINTS).iterdir()
    size = saved_bytes(done / "checkpoint-24")

    root = clone(conversations, tmp_path / "full")
    mount = root / paths.CHECKPOINTS
    with small_file_system(mount, int(size * 2.5)) as resize:
        start = time.time()
        proc = ftflow("train", *KILL, cwd=root, check=False)
        assert proc.returncode == 1 and time.time() - start < 120, proc.stderr[-3000:]
        (ckpt_dir,) = mount.iterdir()
        where = re.escape(str(ckpt_dir.relative_to(root)))
        found = re.search(rf"the file system holding {where} is full: saving checkpoint-6 "
                          r"stopped with ([\d.,]+) MB free; a checkpoint takes ([\d.,]+) MB \(its partial files are "
                          r"removed\).*The rerun resumes from checkpoint-4, the last complete checkpoint",
                          proc.stderr)  # fmt: skip
        assert found and float(found[1]) < float(found[2]) == round(size / 1e6, 1), proc.stderr[-3000:]
        assert sorted(p.name for p in ckpt_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        assert damage(ckpt_dir / "checkpoint-4") is None
        resize(size * 10)
        ftflow("train", *KILL, cwd=root)
        assert summary(root)["resumed_from"] == "checkpoint-4"
        a, b = weights(straight), weights(root)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert losses(root) == losses(straight)


# two processes; a peer that stops answering fails the others after 20 s, not the library's 30 min
LOST = [*KILL, "launcher=ddp", "launcher.collective_timeout_s=20"]


@pytest.fixture(scope="module")
def straight_ddp(conversations, tmp_path_factory) -> Path:
    root = clone(conversations, tmp_path_factory.mktemp("ddp") / "repo")
    ftflow("train", *LOST, cwd=root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_rank_fails_the_run_naming_it_and_the_rerun_resumes(straight_ddp, conversations, tmp_path, fault):
    """One process of a two-process run dies (SIGKILL: the out-of-memory killer, a node gone)
    or stops answering (SIGSTOP: a hung node whose connections stay open). The other stops: at
    once when the peer's connections close, after launcher.collective_timeout_s when they do
    not. The stage fails naming the rank that died, what the other stopped on, and the
    checkpoint the rerun resumes from; the rerun ends with the uninterrupted run's weights."""
    root = clone(conversations, tmp_path / "repo")
    proc = start_stage(root, LOST)
    wait_for_checkpoint(root, 6, proc)
    pid = int((root / paths.WORKERS / "1.pid").read_text())
    os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    began = time.time()
    try:
        err = proc.communicate(timeout=180)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.time() - began
    # killed: torchrun sees its worker end; frozen: the 20 s timeout, then torchrun's 30 s grace
    # before it kills a worker that ignores its SIGTERM
    assert proc.returncode != 0 and (took < 20 if fault == "killed" else 20 <= took < 80), (took, err[-3000:])
    found = re.search(r"training failed \(exit status \d+\): rank 1 \(pid (\d+) on [\w.-]+\) died without a word: "
                      r"killed \(SIGKILL, out of memory\), frozen, or its node lost; rank 0 \(pid \d+ on [\w.-]+\) "
                      r"stopped on (\w+: [^;]+)\. The rerun resumes from (checkpoint-\d+), the last complete checkpoint",
                      err)  # fmt: skip
    assert found and int(found[1]) == pid, err[-3000:]
    if fault == "frozen":
        assert "timed out" in found[2].lower(), found[2]
    (ckpt_dir,) = (root / paths.CHECKPOINTS).iterdir()
    complete = [p.name for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE).exists()]
    assert found[3] == max(complete, key=lambda n: int(n.split("-")[1]))

    ftflow("train", *LOST, cwd=root)
    assert summary(root)["resumed_from"] == found[3] and summary(root)["steps"] == 24
    a, b = weights(straight_ddp), weights(root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(root) == losses(straight_ddp)


@pytest.mark.slow
def test_stop_signal_checkpoints_and_the_workflow_retry_resumes(conversations, tmp_path):
    """Slurm signals a job before its time limit (--signal=TERM@...), every process of the job
    step: the stage saves a checkpoint at the end of the current step, exits non-zero, and
    Snakemake's retry resumes from it. The launchers in between (accelerate, which since 1.16
    ends its worker 5 s after a SIGTERM) must not cut the save short."""
    root = clone(conversations, tmp_path / "repo")
    overrides = [*SMALL_SFT, "train.max_steps=200", "train.save_steps=1000"]
    ftflow("compose", *overrides, cwd=root)
    proc = subprocess.Popen([str(BIN / "snakemake"), "--profile", "profiles/local", "--retries", "1",
                             f"{paths.TRAIN}/summary.json"], cwd=root, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    # The signal comes as early as it can hurt: the training process has started but is still
    # importing (no handler of its own yet), while accelerate already has its own SIGTERM handler.
    deadline = time.time() + 120
    while not any(is_worker(p) for p in psutil.Process(proc.pid).children(recursive=True)):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    # what Slurm's step signal reaches: every process of the job below Snakemake (whose retry we test)
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    log = (root / paths.LOGS / "train.log").read_text()
    first = json.loads(next((root / paths.CHECKPOINTS).glob("*/checkpoint-*/trainer_state.json")).read_text())
    s = summary(root)
    # the signal's checkpoint (save_steps is 1000: no other) is where the retry resumed
    assert s["resumed_from"] is not None and s["steps"] == 200, s
    step = int(s["resumed_from"].split("-")[1])
    assert 0 < step < 200
    assert job_stats(out).get("train") == 1 and "Trying to restart job" in out, out[-3000:]
    # the SIGTERM itself, or the SIGUSR1 the stage passed on when it got its own
    assert re.search(rf"training stopped on SIG(TERM|USR1) at step {step};", out + log), log[-3000:]
    assert first["global_step"] in (step, 200)


def is_worker(process: psutil.Process) -> bool:
    try:
        return "ftflow.train" in process.cmdline() and "ftflow.train.launcher" not in process.cmdline()
    except psutil.NoSuchProcess:
        return False


# --- tracking and secrets ------------------------------------------------------------------------

FAKE_WANDB_KEY = "f3a9c1d27b4e8a6052c9e1f4b7d3a8c6e2f5b9d1"  # 40 hex characters, as wandb keys are
FAKE_HF_TOKEN = "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"


@pytest.mark.slow
def test_tracked_run_writes_provenance_and_no_secret(conversations, tmp_path):
    root = clone(conversations, tmp_path / "repo")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", "--allow-empty"],
                   cwd=root, check=True)  # fmt: skip
    # a remote URL with a token in it, as some users configure: it must not be recorded
    subprocess.run(
        ["git", "remote", "add", "origin", f"https://user:{FAKE_HF_TOKEN}@example.com/r.git"], cwd=root, check=True
    )
    secrets = {"WANDB_API_KEY": FAKE_WANDB_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_HF_TOKEN}
    overrides = [*SMALL_SFT[:-2], "train.logging_steps=1", "tracking=wandb", "tracking.mode=offline",
                 "tracking.tags=[demo,ci]", "train.max_steps=4", "train.save_steps=2"]  # fmt: skip
    proc = ftflow("train", *overrides, cwd=root, env_extra=secrets)
    ckpt = next((root / paths.CHECKPOINTS).glob("*"))
    record = json.loads((ckpt / "provenance.json").read_text())
    assert record["git"]["commit"] and record["config"]["train"]["max_steps"] == 4
    assert record["packages"]["trl"] and record["inputs"]["results/pack/train"]
    assert (root / paths.TRAIN / "model" / "provenance.json").exists()
    runs = list((root / paths.TRAIN / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    written = [p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert len(written) > 50
    texts = [proc.stdout, proc.stderr] + [p.read_bytes().decode("utf-8", "replace") for p in written]
    for secret in (FAKE_WANDB_KEY, FAKE_HF_TOKEN):
        leaks = [str(p) for p, t in zip(["stdout", "stderr", *written], texts) if secret in t]
        assert not leaks, leaks


def test_gpu_launchers_without_gpus_are_a_clear_error(conversations, tmp_path):
    root = clone(conversations, tmp_path / "repo")
    proc = ftflow("train", *SMALL_SFT, "launcher=fsdp", cwd=root, check=False)
    assert proc.returncode == 1 and "needs as many GPUs; this node has 0" in proc.stderr, proc.stderr[-2000:]


# --- the launcher's command line and the tracker's mode ---------------------------------------------


def launcher_flags(*overrides: str) -> list[str]:
    from ftflow.config.schema import Launcher
    from ftflow.train.launcher import accelerate_command

    tree = compose(list(overrides), REPO / "conf")
    return accelerate_command(Launcher.model_validate(tree["launcher"]), False, ["ftflow.train"], {})


def test_each_launcher_becomes_its_accelerate_flags():
    local = launcher_flags()
    assert "--cpu" in local and local[local.index("--num_processes") + 1] == "1"
    ddp = launcher_flags("launcher=ddp")
    assert "--multi_gpu" in ddp and "--cpu" not in ddp and ddp[ddp.index("--num_processes") + 1] == "2"
    z3 = " ".join(launcher_flags("launcher=zero3_offload"))
    assert "--use_deepspeed --zero_stage 3 --offload_optimizer_device cpu --offload_param_device cpu" in z3
    assert "--zero3_save_16bit_model false" in z3  # consolidate gathers the shards
    fsdp = " ".join(launcher_flags("launcher=fsdp", "launcher.num_processes=4", "launcher.fsdp.sharding=SHARD_GRAD_OP"))
    assert "--use_fsdp --fsdp_version 2 --fsdp_reshard_after_forward false" in fsdp and "--num_processes 4" in fsdp


def test_multi_node_needs_slurm():
    from ftflow.train.launcher import LaunchError

    with pytest.raises(LaunchError, match="launcher.nodes=2 needs Slurm"):
        launcher_flags("launcher=gpu", "launcher.nodes=2")
    from ftflow.config.schema import Launcher
    from ftflow.train.launcher import node_tasks_command

    with pytest.raises(LaunchError, match="launcher.nodes=2 needs Slurm: run the train rule through the Slurm profile"):
        node_tasks_command(Launcher(distributed="ddp", nodes=2), ["config.yaml", "."], {})


def test_wandb_goes_online_only_with_a_key(tmp_path, monkeypatch):
    from ftflow.config.schema import Tracking
    from ftflow.train.tracking import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(Tracking()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    assert wandb_mode(Tracking()) == "online"
    assert wandb_mode(Tracking(mode="offline")) == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_WANDB_KEY}\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode(Tracking()) == "online"


def test_the_step_timer_times_the_steps_after_the_warm_up_and_not_the_final_save():
    """summary.json's `speed`: the clock starts after the first two steps and stops at the last
    step's end, before the save the trainer always makes at the end of training (here a 0.3 s
    pause between the last step and the end of training stands for it)."""
    from transformers import TrainerControl, TrainerState

    from ftflow.train.callbacks import StepTimer

    timer, state, control = StepTimer(), TrainerState(max_steps=6), TrainerControl()
    timer.on_train_begin(None, state, control)
    for step in range(1, 7):
        time.sleep(0.01)
        state.global_step = step
        timer.on_step_end(None, state, control)
    time.sleep(0.3)  # the final checkpoint and model save
    timer.on_train_end(None, state, control)
    speed = timer.speed()
    assert speed["after_step"] == 2 and speed["steps"] == 4
    assert 0.04 <= speed["seconds"] < 0.25 and speed["seconds_per_step"] == pytest.approx(
        speed["seconds"] / 4, rel=0.01
    )
