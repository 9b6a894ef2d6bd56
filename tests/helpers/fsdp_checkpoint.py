"""Write a real FSDP sharded checkpoint from 2 CPU processes (gloo), as training under FSDP
leaves it, for consolidate's test: accelerate runs FSDP on GPUs only, so this script does what
its sharded save does: FSDP2 (`fully_shard`) over the model, a few optimizer steps, then
torch.distributed.checkpoint of {"model": state dict} into <out>/pytorch_model_fsdp_0/, the
config beside it, and the probe logits of the sharded model (train's probe.safetensors).

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/fsdp_checkpoint.py <root>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftflow import paths
from ftflow.train.probe import PROBE_FILE, PROBE_POSITIONS, probe_ids


def main(root: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(root / paths.TRAIN / "init", dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = probe_ids(tok)
    for _ in range(3):  # move the weights away from the init
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = root / paths.TRAIN / "model"
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -PROBE_POSITIONS:].float()
    model.reshard()  # the root keeps its parameters gathered after a forward
    local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / "pytorch_model_fsdp_0"))
    if rank == 0:
        model.config.save_pretrained(out)
        save_file({"input_ids": ids[0], "logits": logits.contiguous()}, str(root / paths.TRAIN / PROBE_FILE))
        sharded = sum(1 for n, s in local_shapes.items() if s != tuple(model.get_parameter(n).shape))
        print(f"FSDP: {sharded} of {len(local_shapes)} parameters sharded on rank 0")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
