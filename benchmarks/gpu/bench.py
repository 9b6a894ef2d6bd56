"""ftflow on a GPU, in one run: packed bf16 training speed against plain TRL, the attention path
for packed rows, the optional speed-ups, QLoRA, and a stop/resume.

    bash benchmarks/gpu/run.sh                         # on a GPU box (README: GPU); ~8 minutes
    python benchmarks/gpu/bench.py --cpu --out /tmp/g  # tiny shapes on CPU (the test suite)

Sections, in order of what matters most (each one's failure is recorded and the rest still run;
once --budget-s is spent the rest are recorded as not run):
  env        versions, the device, and the bf16 matmul rate measured here (beside the datasheet peak)
  attention  each attention implementation on a packed row: the logits of its conversations
             packed equal their logits alone (within the precision's own error), and fwd+bwd time
  train      the train stage (`runner.run("train")`: accelerate launch, ftflow's worker) against a
             plain TRL SFTTrainer script on the same model, rows and arguments; per shape, full
             fine-tuning and LoRA: tokens/s, MFU, peak GPU memory, and the ratio
  qlora      QLoRA on the 1B shape: the loss goes down, consolidate merges it and its verification
             passes (on CPU too: bitsandbytes has CPU 4-bit kernels)
  resume     SIGTERM mid-run, the rerun resumes; its loss curve against the uninterrupted run's
  speedups   train.liger_kernel, train.torch_compile, train.gradient_checkpointing, each alone,
             against the plain train stage (Liger: GPU only, and its layer kernels only: TRL's
             SFT trainer keeps its own chunked, fused output layer and loss)
Everything printed is also in <out>/gpu.json and <out>/gpu.md; the children's output in <out>/gpu.log.

MFU = model FLOPs per token x tokens/s / peak, with the PaLM-style count (Chowdhery et al. 2022,
appendix B) for a causal model over packed rows:
  full fine-tuning   6 N + 6 L d c
  LoRA / QLoRA       4 N + 6 N_lora + 6 L d c    (frozen weights: no weight gradients)
N: the weights of every matmul (attention and MLP projections, and the output layer, which a tied
embedding still costs), not the embedding lookup; L layers; d = heads x head_dim; c = sum(s^2) /
sum(s) over the conversations s of the rows (each token attends to half its conversation on
average: forward QK^T and AV cost 2 d s^2 per conversation and layer, the backward twice that).
Gradient checkpointing's recomputation is not counted (it is not model work). Peak: the datasheet's
dense bf16 rate (H100/H200 SXM 989 TFLOP/s); the measured matmul rate is shown beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# modules only a GPU run imports (tests/test_gpu_run.py checks the carried wheels have them)
GPU_ONLY_IMPORTS = {"liger_kernel"}

# the architectures users fine-tune, as their configs give them (random weights: speed depends on
# the shapes only); vocab_size is the tokenizer's (ftflow's scratch init takes it from there)
SHAPES = {
    # meta-llama/Llama-3.2-1B
    "llama-1b": dict(vocab=128256, model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                     tie_word_embeddings=True),
    # Qwen/Qwen2.5-0.5B
    "qwen-0.5b": dict(vocab=151936, model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True),
    # --cpu: the same two families, tiny
    "tiny-llama": dict(vocab=512, model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True),
    "tiny-qwen": dict(vocab=640, model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True),
}  # fmt: skip

# what each mode runs: shapes (the first is "the 1B shape"), packed row length, rows per step,
# steps per run (the first two are warm-up, not timed), attention timing iterations, learning rate
# (a tiny model at a real model's 2e-4 barely moves in 20 steps: the CPU's QLoRA loss would not fall)
PROFILES = {
    "gpu": dict(shapes=["llama-1b", "qwen-0.5b"], max_length=4096, batch=4, steps=12, qlora_steps=30,
                attention_iters=5, learning_rate=2e-4, budget_s=500),
    "cpu": dict(shapes=["tiny-llama", "tiny-qwen"], max_length=256, batch=2, steps=12, qlora_steps=20,
                attention_iters=2, learning_rate=2e-3, budget_s=600),
}  # fmt: skip

# dense bf16 peak by device name (datasheets); others: MFU against the measured matmul rate only
# (the first name found in the device's name wins: the PCIe and NVL parts run slower clocks)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "A10G": 70e12}  # fmt: skip

LORA = dict(r=16, alpha=32)  # conf/peft/lora.yaml's, on every linear layer


# --- FLOPs -------------------------------------------------------------------------------------


def matmul_weights(arch: dict) -> int:
    """N: the weights that take part in a matmul per token (the output layer included, the
    embedding lookup not)."""
    d, layers, vocab = arch["hidden_size"], arch["num_hidden_layers"], arch["vocab"]
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * arch["intermediate_size"]  # gate, up, down
    return layers * (attention + mlp) + vocab * d


def lora_weights(arch: dict, r: int) -> int:
    """LoRA's trainable weights on every linear layer of the blocks: r x (in + out) each."""
    d, layers = arch["hidden_size"], arch["num_hidden_layers"]
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or d // heads
    shapes = [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim), (heads * head_dim, d)]
    shapes += [(d, arch["intermediate_size"])] * 2 + [(arch["intermediate_size"], d)]
    return layers * sum(r * (a + b) for a, b in shapes)


def flops_per_token(arch: dict, context: float, method: str) -> float:
    """Model FLOPs per trained token (the module docstring's formula); context = sum(s^2)/sum(s)."""
    n = matmul_weights(arch)
    d_attn = arch["num_attention_heads"] * (arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"])
    attention = 6 * arch["num_hidden_layers"] * d_attn * context
    if method == "full":
        return 6 * n + attention
    return 4 * n + 6 * lora_weights(arch, LORA["r"]) + attention


# --- data -------------------------------------------------------------------------------------


def conversation_lengths(rng, count: int, max_length: int):
    """Lengths like chat SFT data's in rows of 4096: log-normal with its median at 0.135 of the row
    (~550 tokens), a long tail, cut at the row (scaled down with the row in --cpu mode)."""
    import numpy as np

    median = 0.135 * max_length
    return np.clip(rng.lognormal(mean=np.log(median), sigma=0.8, size=count).astype(int), 4, max_length)


def packed_rows(rows: int, max_length: int, vocab: int, seed: int = 0) -> dict:
    """`rows` packed rows of exactly max_length tokens, as pack writes them (input_ids, labels,
    seq_lengths): conversations of conversation_lengths() placed one after another, the last of
    each row cut to fill it (every step trains the same number of tokens, so tokens/s is
    steps x rows x max_length / seconds). The tokens follow a Zipf law over 2,000 ids (a task the
    loss can go down on); each conversation's first token carries no loss, as a prompt's don't."""
    import numpy as np

    rng = np.random.default_rng(seed)
    common = min(2000, vocab - 2)
    p = 1.0 / np.arange(1, common + 1) ** 1.1
    ids, labels, lengths = [], [], []
    for _ in range(rows):
        row_lengths, room = [], max_length
        for n in conversation_lengths(rng, 64, max_length):
            row_lengths.append(int(min(n, room)))
            room -= row_lengths[-1]
            if room == 0:
                break
        if room:  # 64 short ones did not fill it
            row_lengths.append(room)
        row = (rng.choice(common, size=max_length, p=p / p.sum()) + 2).astype(np.int32)
        lab = row.copy()
        lab[np.cumsum([0, *row_lengths[:-1]])] = -100
        ids.append(row)
        labels.append(lab)
        lengths.append(np.array(row_lengths, np.int32))
    return {"input_ids": ids, "labels": labels, "seq_lengths": lengths}


def attention_context(seq_lengths) -> float:
    """c = sum(s^2) / sum(s): the mean over tokens of the length of their conversation."""
    import numpy as np

    s = np.concatenate(seq_lengths).astype(np.float64)
    return float((s**2).sum() / s.sum())


def tokenizer(vocab: int):
    """A word-level tokenizer with exactly `vocab` ids (the shapes' vocabularies; pack's tokenizer
    folder is what train reads its size from): <pad>, <|im_end|>, then t2 ... t<vocab-1>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<|im_end|>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    # the probe (train) renders a conversation: words it lacks map to <pad>, which is all it needs
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} <|im_end|> {% endfor %}"
    return fast


def prepare_work(work: Path, shape: str, profile: dict) -> dict:
    """A root with pack's output for `shape`: its tokenizer and packed train rows, enough for the
    longest run. Returns the data's facts."""
    import datasets

    from ftflow import paths

    vocab = SHAPES[shape]["vocab"]
    rows = profile["batch"] * max(profile["steps"], profile["qlora_steps"])
    data = packed_rows(rows, profile["max_length"], vocab)
    tokenizer(vocab).save_pretrained(work / paths.PACK / "tokenizer")
    datasets.Dataset.from_dict(data).save_to_disk(str(work / paths.PACK / "train"))
    lengths = data["seq_lengths"]
    return {"rows": rows, "conversations": sum(len(x) for x in lengths), "context": attention_context(lengths)}


# --- config -----------------------------------------------------------------------------------


def config_tree(shape: str, profile: dict, cpu: bool, peft: str = "none", steps: int | None = None,
                **train) -> dict:  # fmt: skip
    """The composed config of a train stage run on `shape`: conf/ as shipped with the model
    replaced by the shape (trained from scratch), no validation, no tracking, no checkpoint
    inside the timed steps."""
    from ftflow.config.params import compose

    steps = steps or profile["steps"]
    # one process: on a GPU, the first (no DDP wrapper around a world of one)
    overrides = [f"peft={peft}", "tracking=none", "launcher=local", f"launcher.cpu={str(cpu).lower()}",
                 f"pack.max_length={profile['max_length']}", f"train.max_steps={steps}",
                 f"train.per_device_batch_size={profile['batch']}", "train.eval_steps=0", "train.logging_steps=1",
                 f"train.save_steps={steps + 1000}", f"train.learning_rate={profile['learning_rate']}", "train.warmup_steps=0"]  # fmt: skip
    if peft != "none":
        overrides += [f"peft.r={LORA['r']}", f"peft.alpha={LORA['alpha']}", "peft.target_modules=all-linear"]
    overrides += [f"train.{k}={json.dumps(v)}" for k, v in train.items()]
    tree = compose(overrides, REPO / "conf")
    arch = {k: v for k, v in SHAPES[shape].items() if k != "vocab"}
    tree["model"].update(name=shape.replace(".", "_"), source="scratch", architecture=arch, dtype="auto")
    return tree


# --- children: each measurement in a fresh process ---------------------------------------------


RUNNING: set[int] = set()  # the process groups of the children running now


def start_child(kind: str, job: dict, log: Path) -> tuple[subprocess.Popen, Path]:
    """Start `bench.py --child kind` on job (a fresh interpreter: clean GPU memory, fresh CUDA
    state) in its own process group (the stage's launcher and workers with it), its output
    appended to the log; returns it and the file its result goes to."""
    job_file = Path(job["work"]) / f"job-{kind}.json"
    result_file = job_file.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job, "result": str(result_file)}))
    with log.open("a") as out:
        out.write(f"\n===== {kind} {job.get('label', '')} =====\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(job_file)], stdout=out,
                                stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)  # fmt: skip
    RUNNING.add(proc.pid)
    return proc, result_file


def end_child(proc: subprocess.Popen) -> None:
    """Kill the child's whole group if it still runs (a timeout, an error here): nothing of a
    measurement may go on holding the GPU while the next one runs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    RUNNING.discard(proc.pid)


def kill_children(signum, frame) -> None:
    """bench.py itself stopped (the machine's time limit): its children go with it."""
    for pgid in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    sys.exit(128 + signum)


def run_child(kind: str, job: dict, log: Path, timeout: float) -> dict:
    """Run a child to its end (or to `timeout`); returns what it wrote."""
    proc, result_file = start_child(kind, job, log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{kind} {job.get('label', '')}: stopped at the run's time budget") from None
    finally:
        end_child(proc)
    if not result_file.exists():
        raise RuntimeError(f"{kind} {job.get('label', '')}: exit status {proc.returncode}, no result (see gpu.log)")
    return json.loads(result_file.read_text())


def child_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "src"), env.get("PYTHONPATH")] if p)
    return env


def child_stage(job: dict) -> dict:
    """The train stage as its rule runs it; its summary and loss curve."""
    from ftflow import paths, runner
    from ftflow.config.params import stage_params

    work = Path(job["work"])
    shutil.rmtree(work / paths.TRAIN / "model", ignore_errors=True)
    if job.get("fresh", True):
        shutil.rmtree(work / paths.CHECKPOINTS, ignore_errors=True)
    runner.run("train", stage_params(job["tree"], "train"), work)
    return {"summary": json.loads((work / paths.TRAIN / "summary.json").read_text()),
            "losses": stage_losses(work)}  # fmt: skip


def stage_losses(work: Path) -> dict[int, float]:
    """{step: training loss} of the stage's loss.csv."""
    import csv

    from ftflow import paths

    with (work / paths.TRAIN / "loss.csv").open() as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "train" and r["metric"] == "loss"}  # fmt: skip


def child_trl(job: dict) -> dict:
    """Plain TRL: SFTTrainer on the same rows, base weights and arguments (padding-free, the
    rows used as they are), timed by the same callback as the stage."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ftflow import paths
    from ftflow.train.callbacks import StepTimer

    work, tree = Path(job["work"]), job["tree"]
    train, peft = tree["train"], tree["peft"]
    gpu = torch.cuda.is_available() and not tree["launcher"]["cpu"]
    model = AutoModelForCausalLM.from_pretrained(work / paths.base_model_dir(tree["model"]),
                                                 dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation=job["attn"])  # fmt: skip
    peft_config = None
    if peft["method"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=peft["r"], lora_alpha=peft["alpha"], target_modules="all-linear",
                                 task_type="CAUSAL_LM")  # fmt: skip
    args = SFTConfig(output_dir=str(work / "trl"), seed=train["seed"], max_steps=train["max_steps"],
                     per_device_train_batch_size=train["per_device_batch_size"],
                     learning_rate=train["learning_rate"], lr_scheduler_type=train["lr_scheduler"],
                     warmup_steps=train["warmup_steps"], logging_steps=1, save_strategy="no", bf16=gpu,
                     use_cpu=not gpu, gradient_checkpointing=train["gradient_checkpointing"], report_to=[],
                     dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, padding_free=True,
                     remove_unused_columns=False)  # fmt: skip
    timer = StepTimer()
    ds = datasets.load_from_disk(str(work / paths.PACK / "train"))
    tok = AutoTokenizer.from_pretrained(work / paths.PACK / "tokenizer")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[timer])  # fmt: skip
    trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return {"summary": {"speed": timer.speed()}, "losses": losses}


def child_attention(job: dict) -> dict:
    """Per attention implementation: a packed row's logits against its conversations' logits
    alone (both against a float32 reference), and the time of a forward and backward pass."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gpu = torch.cuda.is_available() and not job["cpu"]
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    arch = dict(SHAPES[job["shape"]])
    config = AutoConfig.for_model(vocab_size=arch.pop("vocab"), **arch)
    lengths = job["seq_lengths"]
    torch.manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (1, sum(lengths)), device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is float32 proper
    with torch.device(device):  # initialised where it runs (a 1B model's init on CPU takes a while)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    reference = alone_logits(model, ids, lengths)
    model = model.to(dtype)
    found = {"implementations": {}, "dtype": str(dtype).removeprefix("torch.")}
    # the control last: the same row with positions that do not restart (nothing tells the model
    # where conversations end) must fail the check, or the check proves nothing
    flat = torch.arange(sum(lengths), device=device)[None]
    runs = [(impl, impl, positions, job["iters"]) for impl in candidates(gpu)]
    runs.append(("sdpa, positions not restarting (control)", "sdpa", flat, 0))
    for name, impl, pos, iters in runs:
        try:
            found["implementations"][name] = check_attention(model, impl, ids, pos, lengths, reference, iters)
        except Exception as e:  # noqa: BLE001 - an implementation this stack lacks is a result too
            found["implementations"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        Path(job["result"]).write_text(json.dumps(found))  # what was found so far, should the next one crash
    return found


def candidates(gpu: bool) -> list[str]:
    """What this stack offers for packed rows: transformers' sdpa (a block-diagonal mask built
    from the position ids), eager, flex_attention (a block mask), flash-attn 2 when installed,
    and PyTorch's own varlen flash kernel (torch.nn.attention.varlen, CUDA)."""
    import importlib.util

    found = ["sdpa", "eager", "flex_attention"]
    if gpu and importlib.util.find_spec("flash_attn"):
        found.append("flash_attention_2")
    if gpu and register_torch_varlen():
        found.append("torch_varlen")
    return found


def register_torch_varlen(kernel=None) -> bool:
    """PyTorch's varlen flash attention as a transformers attention implementation: the
    conversations of a padding-free row are told apart by where the position ids restart (as
    flash-attn's varlen path does), so no mask is built. `kernel`: a stand-in for
    torch.nn.attention.varlen.varlen_attn (the test's, on CPU, where it has no kernel)."""
    try:
        import inspect

        import torch
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

        if kernel is None:
            from torch.nn.attention.varlen import varlen_attn as kernel
    except ImportError:
        return False
    params = inspect.signature(kernel).parameters  # (its arguments changed between PyTorch releases)
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params
    if gqa:
        options["enable_gqa"] = True
    last: dict = {}  # the bounds of the row in hand: every layer of one forward gets the same position ids

    def torch_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query: [1, heads, T, head_dim]; one padding-free row
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]
        if k.shape[1] != q.shape[1] and not gqa:  # each kv head serves several q heads
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        positions = kwargs["position_ids"]
        if last.get("positions") is not positions:  # (held, so never another tensor at its address)
            starts = torch.nonzero(positions[0] == 0).flatten()
            bounds = torch.cat([starts, torch.tensor([q.shape[0]], device=q.device)]).to(torch.int32)
            last.update(positions=positions, bounds=bounds, longest=int(torch.diff(bounds).max()))  # one sync
        bounds, longest = last["bounds"], last["longest"]
        scale = {"scale": scaling} if "scale" in params else {}
        out = kernel(q, k, v, bounds, bounds, longest, longest, **scale, **options)
        return out[None], None  # [1, T, heads, head_dim], as the other implementations return

    AttentionInterface.register("torch_varlen", torch_varlen)
    ALL_MASK_ATTENTION_FUNCTIONS.register("torch_varlen", flash_attention_mask)
    return True


def alone_logits(model, ids, lengths):
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=c[None], use_cache=False).logits[0].float() for c in ids[0].split(lengths)])


def check_attention(model, impl, ids, positions, lengths, reference, iters: int) -> dict:
    """Packed row vs its conversations alone, each against the float32 reference: packing is
    correct when it adds no error of its own (packed error <= 2x the alone error + 1e-4)."""
    import torch

    model.set_attn_implementation(impl)
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()
    alone = alone_logits(model, ids, lengths)
    packed_err = (packed - reference).abs().max().item()
    alone_err = (alone - reference).abs().max().item()
    del packed, alone  # a 1B model's logits are GBs: the timing below needs the room
    if ids.is_cuda:
        torch.cuda.empty_cache()
    out = {"max_abs_error_packed": packed_err, "max_abs_error_alone": alone_err,
           "correct": packed_err <= 2 * alone_err + 1e-4}  # fmt: skip
    if iters and out["correct"]:
        try:
            out["fwd_bwd_ms"] = fwd_bwd_ms(model, ids, positions, iters)
        except Exception as e:  # noqa: BLE001 - e.g. flex_attention has no backward on CPU
            out["fwd_bwd_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def fwd_bwd_ms(model, ids, positions, iters: int) -> float:
    """Milliseconds of one training forward and backward on the row (after two warm-ups)."""
    import torch

    model.train()
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    for i in range(2 + iters):
        if i == 2:
            sync()
            start = time.perf_counter()
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()
    sync()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / iters * 1000


def child_matmul(job: dict) -> dict:
    """The bf16 (CPU: float32) matmul rate this device reaches, 8192^3 (CPU: 1024^3)."""
    import torch

    gpu = torch.cuda.is_available() and not job["cpu"]
    n, dtype, device = (8192, torch.bfloat16, "cuda") if gpu else (1024, torch.float32, "cpu")
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(20 if gpu else 3):  # the clocks ramp up
        a @ b
    sync()
    start, reps = time.perf_counter(), 300 if gpu else 10  # ~0.4 s on an H100
    for _ in range(reps):
        a @ b
    sync()
    return {"flops_per_s": 2 * n**3 * reps / (time.perf_counter() - start), "n": n, "dtype": str(dtype), "gpu": gpu,
            "device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"}  # fmt: skip


def child_qlora_merge(job: dict) -> dict:
    """consolidate on the QLoRA run's adapter: merged into the base, verified on the probe."""
    from ftflow import runner
    from ftflow.config.params import stage_params

    return runner.run("consolidate", stage_params(job["tree"], "consolidate"), Path(job["work"]))


CHILDREN = {"stage": child_stage, "trl": child_trl, "attention": child_attention, "matmul": child_matmul,
            "consolidate": child_qlora_merge}  # fmt: skip


# --- the sections -------------------------------------------------------------------------------


class Bench:
    """The run's state: where results go, the time budget, and what each section recorded."""

    def __init__(self, out: Path, cpu: bool, budget_s: float | None):
        self.out, self.cpu = out, cpu
        self.profile = PROFILES["cpu" if cpu else "gpu"]
        self.deadline = time.time() + (budget_s or self.profile["budget_s"])
        self.log = out / "gpu.log"
        self.results: dict = {"mode": "cpu" if cpu else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "sections": {}}  # fmt: skip
        self.tmp = Path(tempfile.mkdtemp(prefix="ftflow-gpu-bench-"))
        self.works: dict[str, dict] = {}

    def child(self, kind: str, job: dict) -> dict:
        left = self.deadline - time.time()
        if left < 5:
            raise TimeoutError("out of the run's time budget")
        return run_child(kind, job, self.log, timeout=left)

    def work(self, shape: str) -> tuple[Path, dict]:
        """The shape's root with its data (made once)."""
        if shape not in self.works:
            root = self.tmp / shape
            self.works[shape] = {"root": root, **prepare_work(root, shape, self.profile)}
        return self.works[shape]["root"], self.works[shape]

    def section(self, name: str, fn) -> None:
        if time.time() > self.deadline:
            self.record(name, {"not_run": "out of the run's time budget"})
            return
        start = time.time()
        print(f"\n== {name}", flush=True)
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - one section's failure is its result; the others still run
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.time() - start, 1)
        self.record(name, result)

    def record(self, name: str, result: dict) -> None:
        self.results["sections"][name] = result
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "gpu.md").write_text(markdown(self.results))
        print(json.dumps({name: result}, indent=1, default=str), flush=True)


def env_section(bench: Bench) -> dict:
    import importlib.metadata as md
    import platform

    versions = {}
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "bitsandbytes",
                 "flash-attn", "triton"):  # fmt: skip
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    measured = bench.child("matmul", {"work": str(bench.tmp), "cpu": bench.cpu})  # (no CUDA context here)
    device = measured["device"]
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None) if measured["gpu"] else None
    bench.results.update(device=device, peak_flops=peak, measured_flops=measured["flops_per_s"])
    return {"device": device, "python": platform.python_version(), "versions": versions,
            "datasheet_peak_tflops": peak and peak / 1e12, "measured_matmul_tflops": measured["flops_per_s"] / 1e12,
            "matmul": measured}  # fmt: skip


def attention_section(bench: Bench) -> dict:
    """On the first (1B) shape, its first packed row (max_length tokens, its conversations)."""
    import datasets

    from ftflow import paths

    shape = bench.profile["shapes"][0]
    root, _ = bench.work(shape)
    lengths = [int(n) for n in datasets.load_from_disk(str(root / paths.PACK / "train"))[0]["seq_lengths"]]
    found = bench.child("attention", {"work": str(root), "shape": shape, "seq_lengths": lengths, "cpu": bench.cpu,
                                      "iters": bench.profile["attention_iters"]})  # fmt: skip
    impls = found["implementations"]
    timed = {k: v["fwd_bwd_ms"] for k, v in impls.items() if v.get("correct") and "fwd_bwd_ms" in v}
    control = next(v for k, v in impls.items() if "control" in k)
    pick = min(timed, key=timed.get) if timed else None
    bench.results["attention_pick"] = pick
    return {"shape": shape, "row_conversations": lengths, **found, "fastest_correct": pick,
            "control_caught": not control["correct"]}  # fmt: skip


def speed(bench: Bench, info: dict, shape: str, method: str, result: dict) -> dict:
    """tokens/s, MFU and peak memory of one run from its StepTimer record."""
    s = result["summary"]["speed"]
    tokens = s["steps"] * bench.profile["batch"] * bench.profile["max_length"]
    tps = tokens / s["seconds"] if s["seconds"] else None
    flops = flops_per_token(SHAPES[shape], info["context"], method)
    peak, measured = bench.results.get("peak_flops"), bench.results.get("measured_flops")
    return {"tokens_per_s": tps, "timed_steps": s["steps"], "seconds": s["seconds"],
            "mfu": tps * flops / peak if tps and peak else None,
            "mfu_of_measured_matmul": tps * flops / measured if tps and measured else None,
            "peak_gpu_memory_gib": s["peak_gpu_memory_gib"], "flops_per_token": flops,
            "first_loss": first(result["losses"]), "last_loss": last(result["losses"])}  # fmt: skip


def mean_loss(losses: dict, first: bool, n: int = 5) -> float:
    """The mean loss of the first (or last) n logged steps: one step's loss is noisy."""
    steps = sorted(losses, key=int)
    picked = steps[:n] if first else steps[-n:]
    return sum(losses[s] for s in picked) / len(picked)


def first(losses: dict):
    return losses[min(losses, key=int)] if losses else None


def last(losses: dict):
    return losses[max(losses, key=int)] if losses else None


def train_section(bench: Bench) -> dict:
    """Per shape and method: the train stage, then plain TRL, with the attention `auto` resolves."""
    from ftflow.train.worker import attn_implementation

    rows = []
    attn = "sdpa" if bench.cpu else attn_implementation("auto")
    for shape in bench.profile["shapes"]:
        root, info = bench.work(shape)
        for method, peft in (("full", "none"), ("lora", "lora")):
            tree = config_tree(shape, bench.profile, bench.cpu, peft=peft)
            job = {"work": str(root), "tree": tree, "attn": attn, "label": f"{shape} {method}"}
            row = {"shape": shape, "method": method, "attn": attn}
            for who in ("ftflow", "trl"):
                try:
                    result = bench.child("stage" if who == "ftflow" else "trl", job)
                    row[who] = speed(bench, info, shape, method, result)
                    if who == "ftflow":
                        (bench.tmp / f"losses-{shape}-{method}.json").write_text(json.dumps(result["losses"]))
                except Exception as e:  # noqa: BLE001
                    row[who] = {"error": f"{type(e).__name__}: {e}"}
            a, b = row["ftflow"].get("tokens_per_s"), row["trl"].get("tokens_per_s")
            row["ratio"] = a / b if a and b else None
            rows.append(row)
            bench.record("train", {"runs": rows, "partial": True})
    pick = bench.results.get("attention_pick")
    if pick and pick != attn and pick in ("sdpa", "eager", "flex_attention"):  # model.attn_implementation's
        rows.append(attention_pick_run(bench, pick))
    return {"runs": rows, "data": {s: {k: v for k, v in w.items() if k != "root"} for s, w in bench.works.items()},
            "max_length": bench.profile["max_length"], "rows_per_step": bench.profile["batch"]}  # fmt: skip


def attention_pick_run(bench: Bench, pick: str) -> dict:
    """The train stage on the 1B shape with the attention section's fastest correct pick, where
    that is not what auto chose (the row that would change auto)."""
    shape = bench.profile["shapes"][0]
    root, info = bench.work(shape)
    tree = config_tree(shape, bench.profile, bench.cpu)
    tree["model"]["attn_implementation"] = pick
    row = {"shape": shape, "method": "full", "attn": pick, "trl": {}, "ratio": None}
    try:
        row["ftflow"] = speed(bench, info, shape, "full", bench.child("stage", {"work": str(root), "tree": tree}))
    except Exception as e:  # noqa: BLE001
        row["ftflow"] = {"error": f"{type(e).__name__}: {e}"}
    return row


def qlora_section(bench: Bench) -> dict:
    shape = bench.profile["shapes"][0]
    root, info = bench.work(shape)
    tree = config_tree(shape, bench.profile, bench.cpu, peft="qlora", steps=bench.profile["qlora_steps"])
    result = bench.child("stage", {"work": str(root), "tree": tree, "label": f"{shape} qlora"})
    merged = bench.child("consolidate", {"work": str(root), "tree": tree, "label": f"{shape} qlora merge"})
    losses = result["losses"]
    return {"shape": shape, "steps": bench.profile["qlora_steps"], **speed(bench, info, shape, "lora", result),
            "mean_loss_first_5": mean_loss(losses, first=True), "mean_loss_last_5": mean_loss(losses, first=False),
            "loss_went_down": mean_loss(losses, first=False) < mean_loss(losses, first=True),
            "merged": merged.get("merged_lora"),
            "verification": merged.get("verification")}  # fmt: skip


def resume_section(bench: Bench) -> dict:
    """The last shape, full fine-tuning, train's config: an uninterrupted run, then the same run
    stopped with SIGTERM (what Slurm sends) halfway and run again; the resumed loss curve against
    the uninterrupted one, beside the difference between the two uninterrupted runs (this one and
    train's: on a GPU, kernels are not bitwise deterministic, so that is the noise to expect)."""
    shape = bench.profile["shapes"][-1]
    root, _ = bench.work(shape)
    steps = bench.profile["steps"]
    tree = config_tree(shape, bench.profile, bench.cpu)
    straight = bench.child("stage", {"work": str(root), "tree": tree, "label": f"{shape} uninterrupted"})["losses"]
    stopped_at = stop_midway(bench, root, tree, steps // 2)
    resumed = bench.child("stage", {"work": str(root), "tree": tree, "fresh": False, "label": f"{shape} resumed"})
    curve = resumed["losses"]
    earlier = bench.tmp / f"losses-{shape}-full.json"  # train's run of the same config
    rerun = json.loads(earlier.read_text()) if earlier.exists() else {}
    return {"shape": shape, "steps": steps, "stopped_at_step": stopped_at,
            "resumed_from": resumed["summary"]["resumed_from"], "steps_compared": len(set(curve) & set(straight)),
            "identical": curve == straight and len(curve) == steps,
            "max_rel_loss_diff_resumed": max_rel_diff(curve, straight, after=stopped_at),
            "max_rel_loss_diff_two_uninterrupted_runs": max_rel_diff(rerun, straight, after=stopped_at)}  # fmt: skip


def max_rel_diff(a: dict, b: dict, after: int) -> float | None:
    """The largest |a - b| / |b| over the steps both logged after `after`."""
    diffs = [abs(a[s] - b[s]) / abs(b[s]) for s in a if s in b and int(s) > after]
    return max(diffs) if diffs else None


def stop_midway(bench: Bench, root: Path, tree: dict, step: int) -> int:
    """Start the stage, SIGTERM its whole process group once the loss curve passes `step`;
    returns the step its checkpoint was saved at."""
    from ftflow import paths
    from ftflow.train.launcher import PREEMPTED_FILE

    (root / paths.TRAIN / "loss.csv").unlink(missing_ok=True)
    shutil.rmtree(root / paths.CHECKPOINTS, ignore_errors=True)
    proc, _ = start_child("stage", {"work": str(root), "tree": tree, "label": "stopped midway"}, bench.log)
    try:
        while logged_steps(root) < step:
            if proc.poll() is not None or time.time() > bench.deadline:
                raise RuntimeError(f"the run ended (status {proc.poll()}) or ran out of time before step {step}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as Slurm signals a job step
        proc.wait(timeout=max(5.0, bench.deadline - time.time()))
    finally:
        end_child(proc)
    return json.loads((root / paths.TRAIN / PREEMPTED_FILE).read_text())["step"]


def logged_steps(root: Path) -> int:
    """The last step in the stage's loss curve so far (0 before it has one; a line being
    written is read next time)."""

    try:
        return max(stage_losses(root), default=0)
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def speedups_section(bench: Bench) -> dict:
    """On the first shape, full fine-tuning: each switch alone against the plain stage (train's run)."""
    import torch

    shape = bench.profile["shapes"][0]
    root, info = bench.work(shape)
    switches = {"gradient_checkpointing": {"gradient_checkpointing": True}}
    if torch.cuda.is_available() and not bench.cpu:
        switches = {"liger_kernel": {"liger_kernel": True}, **switches, "torch_compile": {"torch_compile": True}}
    base = next((r["ftflow"] for r in bench.results["sections"].get("train", {}).get("runs", [])
                 if r["shape"] == shape and r["method"] == "full"), {})  # fmt: skip
    rows = {}
    for name, train in switches.items():
        tree = config_tree(shape, bench.profile, bench.cpu, **train)
        try:
            result = bench.child("stage", {"work": str(root), "tree": tree, "label": f"{shape} {name}"})
            rows[name] = speed(bench, info, shape, "full", result)
            if base.get("tokens_per_s") and rows[name]["tokens_per_s"]:
                rows[name]["vs_plain"] = rows[name]["tokens_per_s"] / base["tokens_per_s"]
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
    not_run = {} if len(switches) > 1 else {"liger_kernel, torch_compile": "GPU only (Triton kernels; "
                                                                           "compilation takes minutes on CPU)"}  # fmt: skip
    return {"shape": shape, "plain": base, "switches": rows, "not_run": not_run}


# --- the report --------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """The tables the README shows."""
    s = results["sections"]
    lines = [f"# ftflow GPU benchmark ({results['mode']}, {results.get('device', '?')}, {results['started']})", ""]
    env = s.get("env", {})
    if "versions" in env:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), "",
                  f"Peak: datasheet {fmt(env.get('datasheet_peak_tflops'))} TFLOP/s; measured matmul "
                  f"{fmt(env.get('measured_matmul_tflops'))} TFLOP/s", ""]  # fmt: skip
    train = s.get("train", {})
    if train.get("runs"):
        lines += ["| shape | method | attention | ftflow tok/s | TRL tok/s | ftflow / TRL | ftflow MFU | TRL MFU | "
                  "ftflow peak GiB | TRL peak GiB |", "|" + " --- |" * 10]  # fmt: skip
        for r in train["runs"]:
            f, t = r["ftflow"], r["trl"]
            lines.append(f"| {r['shape']} | {r['method']} | {r['attn']} | {fmt(f.get('tokens_per_s'), 0)} | "
                         f"{fmt(t.get('tokens_per_s'), 0)} | {fmt(r.get('ratio'), 2)}x | {pct(f.get('mfu'))} | "
                         f"{pct(t.get('mfu'))} | {fmt(f.get('peak_gpu_memory_gib'), 1)} | "
                         f"{fmt(t.get('peak_gpu_memory_gib'), 1)} |")  # fmt: skip
        lines.append("")
    att = s.get("attention", {})
    if att.get("implementations"):
        lines += ["| attention | packed = alone | max error packed / alone | fwd+bwd ms |", "| --- | --- | --- | --- |"]
        for name, v in att["implementations"].items():
            if "error" in v:
                lines.append(f"| {name} | not available: {v['error'][:80]} | | |")
                continue
            ms = fmt(v.get("fwd_bwd_ms"), 1) if "fwd_bwd_error" not in v else v["fwd_bwd_error"][:80]
            lines.append(f"| {name} | {'yes' if v['correct'] else 'NO'} | {v['max_abs_error_packed']:.3g} / "
                         f"{v['max_abs_error_alone']:.3g} | {ms} |")  # fmt: skip
        lines += ["", f"Fastest correct: {att.get('fastest_correct')}", ""]
    for name in ("speedups", "qlora", "resume"):
        if name in s:
            lines += [f"## {name}", "", "```", json.dumps(s[name], indent=1, default=str), "```", ""]
    errors = {k: v["error"] for k, v in s.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["## failed sections", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def fmt(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


SECTIONS = {"env": env_section, "attention": attention_section, "train": train_section, "qlora": qlora_section,
            "resume": resume_section, "speedups": speedups_section}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (the test suite)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, help="stop starting sections after this (default: gpu 500, cpu 600)")
    parser.add_argument("--steps", type=int, help="steps per run (default 12; the first two untimed)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, job_file = args.child
        job = json.loads(Path(job_file).read_text())
        Path(job["result"]).write_text(json.dumps(CHILDREN[kind](job), default=str))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, kill_children)
    bench = Bench(args.out, args.cpu, args.budget_s)
    if args.steps:
        bench.profile = {**bench.profile, "steps": args.steps}
    try:
        for name in args.sections.split(","):
            bench.section(name, lambda fn=SECTIONS[name]: fn(bench))
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    print(f"\nwritten: {args.out / 'gpu.json'}, {args.out / 'gpu.md'}, {bench.log}")


if __name__ == "__main__":
    main()
