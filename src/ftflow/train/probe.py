"""A fixed conversation whose next-token logits the trained model records (train) and the
model consolidate writes must reproduce (a merge, a shard conversion or a corrupted file that
changes the weights shows up here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftflow.errors import StageError

PROBE = [{"role": "user", "content": "Which word comes last: red, cat, sea?"}]
PROBE_FILE = "probe.safetensors"  # in train's output folder
PROBE_POSITIONS = 8  # the last positions' logits are kept (a row of vocabulary size each)


class ProbeError(StageError):
    pass


def probe_ids(tok):
    return tok.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def record_probe(trainer, tok, path: Path) -> None:
    """The trained model's logits on the probe, from the model in memory (every process runs
    the forward: under ZeRO-3 it gathers the sharded parameters), with the precision they were
    computed in: consolidate compares like with like (16-bit logits differ from float32 ones
    by rounding alone, and that is no damage)."""
    import torch
    from safetensors.torch import save_file

    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    ids = probe_ids(tok).to(trainer.args.device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -PROBE_POSITIONS:].float().cpu()
    # the base weights' dtype (LoRA adapters may be float32 over a bf16 base; DeepSpeed casts
    # the module itself to bf16 when it trains in bf16); no autocast around this forward
    dtype = str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    if trainer.is_world_process_zero():
        meta = {"dtype": dtype, "device": ids.device.type}
        save_file({"input_ids": ids[0].cpu(), "logits": logits.contiguous()}, str(path), metadata=meta)


@dataclass
class Probe:
    """What train recorded: the probe's token ids, the trained model's logits at its last
    positions, and the precision (weights' dtype) and device they were computed with."""

    input_ids: Any
    logits: Any
    dtype: str = "float32"  # probes written before the precision was recorded: float32 training
    device: str = "cpu"


def read_probe(train_dir: Path) -> Probe:
    from safetensors import safe_open

    path = train_dir / PROBE_FILE
    if not path.exists():
        raise ProbeError(f"{path} is missing: rerun train (it records the trained model's logits there)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return Probe(tensors["input_ids"], tensors["logits"], **{k: meta[k] for k in ("dtype", "device") if k in meta})


def logprobs(model, probe: Probe):
    """log p over the vocabulary at the probe's recorded positions, as float32."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=probe.input_ids[None]).logits[0, -probe.logits.shape[0] :].float()
    if logits.shape != probe.logits.shape:
        raise ProbeError(
            f"verification: logits of shape {tuple(logits.shape)}, the trained model's {tuple(probe.logits.shape)}"
        )
    return logits.log_softmax(-1)
