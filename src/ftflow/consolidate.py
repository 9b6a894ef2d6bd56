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

import yaml

from ftflow import paths
from ftflow.config import Consolidate, Model, Peft, StageError, Template, fingerprint, write_stage_config
from ftflow.provenance import git_state, manifest_digest

log = logging.getLogger(__name__)


class ConsolidateError(StageError):
    pass


def merged_model(model_cfg: Model, peft_cfg: Peft, dtype, root: Path, vocab_size: int):
    """The trained model as one in-memory model: adapters merged, shards gathered."""
    trained = root / paths.TRAIN / "model"
    if peft_cfg.method == "none":
        return load_full(trained, dtype, model_cfg.trust_remote_code)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = root / paths.base_model_dir(model_cfg.model_dump())
    log.info("Merging the LoRA adapter in %s into <%s>", trained, base_dir)
    # the base in full precision on CPU (a merge on the GPU is where large models run out of
    # memory); for QLoRA this is the unquantized base the adapter was trained over
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, device_map="cpu"
    )
    if vocab_size > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(vocab_size)  # as train did
    return PeftModel.from_pretrained(base, trained).merge_and_unload()


def load_full(trained: Path, dtype, trust_remote_code: bool):
    """Full weights in any of the forms training leaves them: HF safetensors, a DeepSpeed ZeRO
    checkpoint (`latest` + global_step*/ shards, when ZeRO-3 did not gather the weights at save
    time), or an FSDP sharded state dict (torch.distributed.checkpoint, pytorch_model_fsdp_0/)."""
    from transformers import AutoModelForCausalLM

    if (trained / "latest").exists() and not _has_weights(trained):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        log.info("Gathering the ZeRO shards in %s with DeepSpeed's zero_to_fp32", trained)
        state = get_fp32_state_dict_from_zero_checkpoint(str(trained))
        return _from_state_dict(trained, state, dtype, trust_remote_code)
    fsdp = sorted(trained.glob("pytorch_model_fsdp_*"))
    if fsdp and not _has_weights(trained):
        log.info("Reading the FSDP sharded checkpoint %s", fsdp[0])
        return _from_state_dict(trained, dcp_state_dict(fsdp[0]), dtype, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(trained, dtype=dtype, trust_remote_code=trust_remote_code)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))


def dcp_state_dict(folder: Path) -> dict:
    """A torch.distributed.checkpoint folder as one state dict, in this process (no process
    group): the format FSDP's sharded saves use. Keys lose accelerate's "model." prefix."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/full.pt")
        state = torch.load(f"{tmp}/full.pt", map_location="cpu", weights_only=True)
    if set(state) == {"model"}:
        state = state["model"]
    return {k.removeprefix("model.") if k.startswith("model.model.") or k.startswith("model.lm_head") else k: v
            for k, v in state.items()}  # fmt: skip


def _from_state_dict(folder: Path, state: dict, dtype, trust_remote_code: bool):
    """The model of folder/config.json with `state` as its weights; every weight must be there
    (transformers ties the output embedding to the input one when the config says so)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                              output_loading_info=True)  # fmt: skip
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ConsolidateError(
            f"{folder}: the checkpoint does not fit the model of its config.json "
            f"(missing {sorted(info['missing_keys'])[:5]}, unexpected {sorted(info['unexpected_keys'])[:5]})"
        )
    return model


def verify(model, probe_path: Path, tolerance: float | None, dtype: str) -> dict:
    """The written model's log-probabilities on the probe against those the trained model
    recorded (train's probe.safetensors); a difference above the tolerance fails the stage."""
    import torch
    from safetensors.torch import load_file

    if not probe_path.exists():
        raise ConsolidateError(f"{probe_path} is missing: rerun train (it records the trained model's logits there)")
    probe = load_file(str(probe_path))
    want = probe["logits"]
    with torch.no_grad():
        got = model(input_ids=probe["input_ids"][None]).logits[0, -want.shape[0]:].float()
    if got.shape != want.shape:
        raise ConsolidateError(f"verification: logits of shape {tuple(got.shape)}, the trained model's {tuple(want.shape)}")
    diff = (got.log_softmax(-1) - want.log_softmax(-1)).abs()
    worst = float(diff.max()) if torch.isfinite(diff).all() else float("inf")
    tol = tolerance if tolerance is not None else (1e-3 if dtype == "float32" else 0.1)
    result = {"max_abs_logprob_diff": worst, "tolerance": tol, "positions": want.shape[0],
              "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean()), "ok": worst <= tol}  # fmt: skip
    return result


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


def model_card(cfg: dict, root: Path, check: dict) -> str:
    """README.md of the model: where it came from (base + revision, code, config, data) and how
    it was trained, from train's provenance record and summary."""
    git = git_state(root)
    train_dir = root / paths.TRAIN
    record = _json_or_none(train_dir / "model" / "provenance.json") or {}
    summary = _json_or_none(train_dir / "summary.json") or {}
    train_cfg = (record.get("config") or {}).get("train", {})
    model = cfg["model"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [ftflow]",
        "---",
        f"# {model['name']} fine-tuned with ftflow",
        "",
        f"- base model: {model['source']} `{model.get('hub_id') or model.get('path') or model['name']}`"
        + (f" @ `{model['revision']}`" if model.get("revision") else ""),
        f"- training: {train_cfg.get('method', '?')}, {cfg['peft']['method'] if cfg['peft']['method'] != 'none' else 'full weights'}"
        + (f"; {summary.get('steps')} steps, final loss {summary.get('final_loss'):.4g}" if summary.get("final_loss") is not None else ""),
        f"- code: commit `{git['commit']}`" + (" (uncommitted changes)" if git["dirty"] else ""),
        f"- config fingerprint: `{fingerprint(cfg)}`; data manifest sha256: `{manifest_digest(root)}`",
        "- chat template: in tokenizer_config; generation eos = the template's end-of-turn token",
        f"- verified: max |log p| difference {check['max_abs_logprob_diff']:.2g} from the trained model on a probe",
    ]  # fmt: skip
    if record.get("inputs"):
        lines += ["", "## Training data (sha256)", ""] + [f"- `{k}`: `{v}`" for k, v in record["inputs"].items()]
    if record.get("packages"):
        lines += ["", "## Packages", ""] + [f"- {k} {v}" for k, v in record["packages"].items() if v]
    if train_cfg:
        lines += ["", "## Training config", "", "```yaml", yaml.safe_dump(record["config"], sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _json_or_none(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def consolidate(cfg: dict, root: Path = Path(".")) -> dict:
    """Run the stage; `cfg` is the stage's params (model, peft, template, consolidate)."""
    import torch
    from transformers import AutoTokenizer

    model_cfg, peft_cfg = Model.model_validate(cfg["model"]), Peft.model_validate(cfg["peft"])
    tpl, cons = Template.model_validate(cfg["template"]), Consolidate.model_validate(cfg["consolidate"])
    out_dir = root / paths.CONSOLIDATE / "model"
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    model = merged_model(model_cfg, peft_cfg, getattr(torch, cons.dtype), root, len(tok))
    check = verify(model.eval(), root / paths.TRAIN / "probe.safetensors", cons.verify_tolerance, cons.dtype)
    (out_dir.parent).mkdir(parents=True, exist_ok=True)
    (out_dir.parent / "verification.json").write_text(json.dumps(check, indent=2))
    if not check["ok"]:
        raise ConsolidateError(
            f"verification failed: the consolidated model's log-probabilities on the probe differ from the "
            f"trained model's by up to {check['max_abs_logprob_diff']:.3g} (tolerance {check['tolerance']:g}; "
            f"argmax agrees at {check['argmax_agree']:.0%} of positions). A training output is damaged or was "
            f"converted wrongly; nothing was written to {out_dir}"
        )
    log.info("Verified: max |log p| difference %.3g on the probe (tolerance %g)", check["max_abs_logprob_diff"], check["tolerance"])
    eos_id = set_generation_eos(model, tok, tpl.eos_token)
    log.info("Saving the consolidated model to %s", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=cons.max_shard_size)
    tok.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(model_card(cfg, root, check))
    write_stage_config(cfg, out_dir.parent)
    summary = {"eos_token_id": eos_id, "parameters": model.num_parameters(), "merged_lora": peft_cfg.method != "none",
               "verification": check}  # fmt: skip
    (out_dir.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
