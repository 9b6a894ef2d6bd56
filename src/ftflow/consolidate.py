"""consolidate: the training output -> one plain Hugging Face model directory.

LoRA adapters are merged into the base weights (PEFT's merge_and_unload), so the result loads
with `AutoModelForCausalLM.from_pretrained` alone: safetensors weights, the tokenizer with its
chat template, and a generation config whose eos is the token that ends the template's turns
(otherwise generation runs past the answer).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ftflow import paths
from ftflow.config import Consolidate, Model, Peft, Template, fingerprint, write_stage_config
from ftflow.provenance import git_state, manifest_digest

log = logging.getLogger(__name__)


def merged_model(model_cfg: Model, peft_cfg: Peft, dtype, root: Path, vocab_size: int):
    from transformers import AutoModelForCausalLM

    trained = root / paths.TRAIN / "model"
    if peft_cfg.method == "none":
        return AutoModelForCausalLM.from_pretrained(trained, dtype=dtype)
    from peft import PeftModel

    base_dir = root / paths.base_model_dir(model_cfg.model_dump())
    log.info("Merging the LoRA adapter in %s into <%s>", trained, base_dir)
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code
    )
    if vocab_size > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(vocab_size)  # as train did
    return PeftModel.from_pretrained(base, trained).merge_and_unload()


def set_generation_eos(model, tok, eos_token: str | None) -> int:
    from transformers import GenerationConfig

    eos = tok.eos_token if eos_token is None else eos_token
    eos_id = tok.convert_tokens_to_ids(eos)
    if eos_id is None or eos_id == tok.unk_token_id:
        raise ValueError(f"template eos token {eos!r} is not in the tokenizer's vocabulary")
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=tok.pad_token_id)
    return eos_id


def model_card(cfg: dict, root: Path) -> str:
    git = git_state(root)
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [ftflow]",
        "---",
        f"# {cfg['model']['name']} fine-tuned with ftflow",
        "",
        f"- base model: {cfg['model']['source']} `{cfg['model'].get('hub_id') or cfg['model'].get('path') or cfg['model']['name']}`"
        + (f" @ `{cfg['model']['revision']}`" if cfg["model"].get("revision") else ""),
        f"- fine-tuning: {cfg['peft']['method'] if cfg['peft']['method'] != 'none' else 'full'}",
        f"- code: commit `{git['commit']}`" + (" (uncommitted changes)" if git["dirty"] else ""),
        f"- config fingerprint: `{fingerprint(cfg)}`; data manifest sha256: `{manifest_digest(root)}`",
        "- chat template: in tokenizer_config; generation eos = the template's end-of-turn token",
        "",
    ])  # fmt: skip


def consolidate(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage; `cfg` is the stage's params (model, peft, template, consolidate)."""
    import torch
    from transformers import AutoTokenizer

    model_cfg, peft_cfg = Model.model_validate(cfg["model"]), Peft.model_validate(cfg["peft"])
    tpl, cons = Template.model_validate(cfg["template"]), Consolidate.model_validate(cfg["consolidate"])
    out_dir = root / paths.CONSOLIDATE / "model"
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    model = merged_model(model_cfg, peft_cfg, getattr(torch, cons.dtype), root, len(tok))
    eos_id = set_generation_eos(model, tok, tpl.eos_token)
    log.info("Saving the consolidated model to %s", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=cons.max_shard_size)
    tok.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(model_card(cfg, root))
    write_stage_config(cfg, out_dir.parent)
    summary = {"eos_token_id": eos_id, "parameters": model.num_parameters(), "merged_lora": peft_cfg.method == "lora"}
    (out_dir.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
