"""consolidate: the training output -> one plain Hugging Face model directory.

LoRA adapters are merged into the base weights (PEFT's merge_and_unload), so the result loads
with `AutoModelForCausalLM.from_pretrained` alone: safetensors weights, the tokenizer with its
chat template, and a generation config whose eos includes the token that ends the template's
turns (otherwise generation runs past the answer); a pretrained base keeps its own generation
config (sampling defaults, all its eos ids).

Before anything is written the result is checked on a probe, like with like: the trained
weights as read here against the logits train recorded, at the precision training ran in (a
damaged or wrongly gathered output shows up here), and the merged model against the unmerged
one, both in float32. A 16-bit model's logits differ from float32 ones by rounding alone (up
to about 1 in log-probability for a 30-layer model): that is measured and reported, never
taken for damage. A QLoRA adapter is checked over the base quantized again as train quantized
it (the model it was trained and recorded with), then merged into the full-precision base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from ftflow import paths
from ftflow.config.params import write_stage_config
from ftflow.config.schema import Model, Peft, StageConfig
from ftflow.disk import room_for
from ftflow.errors import StageError
from ftflow.hashing import fingerprint
from ftflow.provenance import git_state, manifest_digest
from ftflow.train.probe import Probe, logprobs, read_probe

log = logging.getLogger(__name__)


class ConsolidateError(StageError):
    pass


def trained_model(model_cfg: Model, peft_cfg: Peft, dtype, root: Path, vocab_size: int):
    """The trained model as one in-memory model at `dtype`, shards gathered; adapters attached
    but not merged yet (verify compares the merge with them). For QLoRA the adapter goes over the
    full-precision base: that is what the merge produces."""
    if peft_cfg.method == "none":
        return load_full(root / paths.TRAIN / "model", dtype, model_cfg.trust_remote_code)
    return adapter_model(model_cfg, dtype, root, vocab_size)


def adapter_model(model_cfg: Model, dtype, root: Path, vocab_size: int, quantization=None):
    """train's adapter over the base, on CPU (a merge on the GPU is where large models run out of
    memory); `quantization`: the base quantized as train quantized it (QLoRA), and the adapter
    computing in the dtype it was saved in, as in training (TRL trains QLoRA adapters in bf16;
    PEFT would widen them to float32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = root / paths.TRAIN / "model"
    base_dir = root / paths.base_model_dir(model_cfg.model_dump())
    log.info("Loading the LoRA adapter in %s over <%s>%s", trained, base_dir, " quantized" if quantization else "")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                                                device_map={"": "cpu"}, quantization_config=quantization)  # fmt: skip
    if quantization is not None:
        from ftflow.train.quantization import plain_cpu_kernels

        plain_cpu_kernels(base)  # the kernels train ran on CPU
    if vocab_size > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(vocab_size)  # as train did
    return PeftModel.from_pretrained(base, trained, autocast_adapter_dtype=quantization is None)


def quantized_logprobs(model_cfg: Model, peft_cfg: Peft, root: Path, vocab_size: int, probe: Probe):
    """QLoRA: the probe's log-probabilities from the adapter over the base quantized to 4 bits
    as train quantized it (bitsandbytes' CPU kernels), the model train recorded the probe with;
    None where the installed bitsandbytes has no CPU kernels (the check is then skipped, saying so)."""
    import torch

    from ftflow.train import quantization

    if "cpu" not in quantization.kbit_devices():
        return None
    model = adapter_model(
        model_cfg, getattr(torch, probe.dtype), root, vocab_size, quantization.quantization_config(peft_cfg)
    )
    at_training = logprobs(model.eval(), probe)
    del model  # (before the full-precision copy is loaded)
    return at_training


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


# --- verification ---------------------------------------------------------------------------

TOL_FLOAT32 = 1e-3  # both sides float32: only summation order differs
MIN_TOL_16BIT = 0.1
ROUNDING_MARGIN = 3.0  # another device's 16-bit kernels round differently again: a margin over this one's


def compare(got, want) -> dict:
    import torch

    diff = (got - want).abs()
    worst = float(diff.max()) if torch.isfinite(diff).all() else float("inf")
    return {"max_abs_logprob_diff": worst, "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def tolerance(dtype: str, rounding: float, override: float | None) -> float:
    """float32 against float32: tight. 16-bit: a margin over what rounding to that dtype does to
    this model's log-probabilities on the probe (measured, not guessed: it grows with depth)."""
    if override is not None:
        return override
    return TOL_FLOAT32 if dtype == "float32" else max(MIN_TOL_16BIT, ROUNDING_MARGIN * rounding)


def verify(model, probe: Probe, out_dtype: str, peft_cfg: Peft, override: float | None, quantized=None):
    """Check the trained model (at the training precision, as trained_model() loaded it), merge
    its adapters and cast it to the output dtype. Returns the model to write and the record;
    `record["ok"]` is False when a check failed (see failure()). QLoRA: `quantized` holds the
    probe's log-probabilities over the 4-bit base (quantized_logprobs), which the trained-weights
    check compares instead."""
    import torch

    train_dtype = probe.dtype
    recorded = probe.logits.float().log_softmax(-1)
    at_training = logprobs(model, probe)
    model = model.float()  # the trained weights, exactly (a widening cast)
    at_float32 = at_training if train_dtype == "float32" else logprobs(model, probe)
    rounding = compare(at_training, at_float32)["max_abs_logprob_diff"]
    checks = {}
    if peft_cfg.method == "qlora" and quantized is None:
        checks["trained_weights"] = {"skipped": "trained over a 4-bit base (QLoRA), and the bitsandbytes here has no "
                                                "CPU kernels to quantize it again", "ok": True}  # fmt: skip
    elif peft_cfg.method == "qlora":
        # the 4-bit layers and TRL's QLoRA adapters compute in bfloat16 whatever the other weights'
        # dtype: a 16-bit comparison (train on CPU gives the same numbers; a GPU's kernels round
        # differently)
        checks["trained_weights"] = {
            "compares": f"the adapter over the base quantized to 4 bits as train did (bitsandbytes on cpu, bfloat16 "
                        f"compute) vs the logits train recorded (train on {probe.device})",
            **compare(quantized, recorded), "tolerance": tolerance("bfloat16", rounding, override),
        }  # fmt: skip
    else:
        checks["trained_weights"] = {
            "compares": f"the trained weights as read here vs the logits train recorded, both {train_dtype} "
                        f"(train on {probe.device}, this check on cpu)",
            **compare(at_training, recorded), "tolerance": tolerance(train_dtype, rounding, override),
        }  # fmt: skip
    if peft_cfg.method != "none":
        model = model.merge_and_unload()  # in float32: a 16-bit merge would round small updates away
        merged = logprobs(model, probe)
        checks["merge"] = {"compares": "the merged model vs the trained model with its adapters, both float32",
                           **compare(merged, at_float32), "tolerance": tolerance("float32", 0.0, override)}  # fmt: skip
    else:
        merged = at_float32
    for check in checks.values():
        if "ok" not in check:
            check["ok"] = check["max_abs_logprob_diff"] <= check["tolerance"]
    model = model.to(getattr(torch, out_dtype))
    written = merged if out_dtype == "float32" else logprobs(model, probe)
    precision = {
        "training": train_dtype, "output": out_dtype,
        # what rounding to each dtype alone moves this model's log-probabilities by
        "training_rounding": rounding, "output_rounding": compare(written, merged)["max_abs_logprob_diff"],
        # the written model against train's record across precisions: no fault, for information
        "written_vs_recorded": compare(written, recorded)["max_abs_logprob_diff"],
    }  # fmt: skip
    if quantized is not None:
        # the merge puts the adapter on the full-precision base, not on the 4-bit one it was trained over
        precision["dequantization"] = compare(at_float32, quantized)["max_abs_logprob_diff"]
    binding = max((c for c in checks.values() if "tolerance" in c), key=lambda c: c["max_abs_logprob_diff"] / c["tolerance"],
                  default={"max_abs_logprob_diff": 0.0, "tolerance": 0.0, "argmax_agree": 1.0})  # fmt: skip
    record = {"ok": all(c["ok"] for c in checks.values()) and precision["output_rounding"] != float("inf"),
              "check": next((n for n, c in checks.items() if c is binding), None),
              **{k: binding[k] for k in ("max_abs_logprob_diff", "tolerance", "argmax_agree")},
              "positions": probe.logits.shape[0], "precision": precision, "checks": checks}  # fmt: skip
    return model, record


def failure(record: dict, out_dir: Path) -> str:
    """Why the check failed: damage (the trained weights no longer give what train recorded, at
    the same precision), a faulty merge, or an output dtype too narrow for the model."""
    nothing = f"nothing was written to {out_dir}"
    prec, trained, merge = record["precision"], record["checks"]["trained_weights"], record["checks"].get("merge")
    if not trained["ok"] and "dequantization" in prec:
        return (
            f"verification failed: the trained weights in {paths.TRAIN}/model, the QLoRA adapter over the base quantized "
            f"to 4 bits again as train did, give log-probabilities on the probe that differ from those train recorded "
            f"by up to {trained['max_abs_logprob_diff']:.3g} (tolerance {trained['tolerance']:g}, a bfloat16 comparison; "
            f"argmax agrees at {trained['argmax_agree']:.0%} of positions). The adapter or the base is not the one "
            f"train used, or a file is damaged; or, for a model trained on a GPU, that GPU's 4-bit kernels round "
            f"further from the CPU's than the tolerance allows (consolidate.verify_tolerance sets it); {nothing}"
        )
    if not trained["ok"]:
        t = prec["training"]
        rounding = f"; {t} rounding alone moves them by up to {prec['training_rounding']:.3g}" if t != "float32" else ""
        return (
            f"verification failed: the trained weights in {paths.TRAIN}/model, run at the precision training ran in "
            f"({t}), give log-probabilities on the probe that differ from those train recorded by up to "
            f"{trained['max_abs_logprob_diff']:.3g} (tolerance {trained['tolerance']:g}{rounding}; argmax agrees at "
            f"{trained['argmax_agree']:.0%} of positions). Not a precision difference: both sides are {t}. A training "
            f"output is damaged or was gathered wrongly; {nothing}"
        )
    if merge and not merge["ok"]:
        return (
            f"verification failed: merging the LoRA adapter changed the log-probabilities on the probe by up to "
            f"{merge['max_abs_logprob_diff']:.3g} (tolerance {merge['tolerance']:g}; both sides float32, so not a "
            f"precision difference): the merge went wrong; {nothing}"
        )
    return (
        f"verification failed: in {prec['output']} the model's log-probabilities on the probe are not finite (its "
        f"activations overflow that dtype): set consolidate.dtype=bfloat16 or float32; {nothing}"
    )


# --- generation config -------------------------------------------------------------------------


def set_generation_eos(model, tok, eos_token: str | None, base_dir: Path | None = None) -> int:
    """Generation stops at the template's end-of-turn token. A pretrained base (base_dir) keeps
    its own generation config, every field of it (sampling defaults, several eos ids), with
    that token added to its eos ids when missing; a scratch model gets one with just eos and pad."""
    from transformers import GenerationConfig

    eos = tok.eos_token if eos_token is None else eos_token
    eos_id = tok.convert_tokens_to_ids(eos)
    if eos_id is None or eos_id == tok.unk_token_id:
        raise ValueError(f"template eos token {eos!r} is not in the tokenizer's vocabulary")
    if base_dir is not None and (base_dir / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(base_dir)
        ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        ids = [i for i in ids if i is not None]
        ids += [eos_id] if eos_id not in ids else []
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
        if gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id
        model.generation_config = gen
        return eos_id
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
        *([f"- weights: step {summary['kept']['step']}, {summary['kept']['why']}"] if summary.get("kept") else []),
        f"- code: commit `{git['commit']}`" + (f" (uncommitted changes to {', '.join(git.get('changed') or ['tracked files'])})"
                                               if git["dirty"] else ""),  # fmt: skip
        f"- config fingerprint: `{fingerprint(cfg)}`; data manifest sha256: `{manifest_digest(root)}`",
        "- chat template: in tokenizer_config; generation eos = the template's end-of-turn token",
        f"- verified: max |log p| difference {check['max_abs_logprob_diff']:.2g} from the trained model on a probe"
        f" (trained in {check['precision']['training']}, written in {check['precision']['output']})",
    ]  # fmt: skip
    if record.get("inputs"):
        lines += ["", "## Training data (sha256)", ""] + [f"- `{k}`: `{v}`" for k, v in record["inputs"].items()]
    if record.get("packages"):
        lines += ["", "## Packages", ""] + [f"- {k} {v}" for k, v in record["packages"].items() if v]
    if train_cfg:
        lines += [
            "",
            "## Training config",
            "",
            "```yaml",
            yaml.safe_dump(record["config"], sort_keys=False).rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _json_or_none(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def consolidate(cfg: StageConfig, root: Path = Path(".")) -> dict:
    """Run the stage on its config (model, peft, template, consolidate)."""
    import torch
    from transformers import AutoTokenizer

    model_cfg, peft_cfg, tpl, cons = cfg.model, cfg.peft, cfg.template, cfg.consolidate
    out_dir = root / paths.CONSOLIDATE / "model"
    tok = AutoTokenizer.from_pretrained(root / paths.PACK / "tokenizer")
    probe = read_probe(root / paths.TRAIN)
    quantized = quantized_logprobs(model_cfg, peft_cfg, root, len(tok), probe) if peft_cfg.method == "qlora" else None
    model = trained_model(model_cfg, peft_cfg, getattr(torch, probe.dtype), root, len(tok))
    model, check = verify(model.eval(), probe, cons.dtype, peft_cfg, cons.verify_tolerance, quantized)
    (out_dir.parent).mkdir(parents=True, exist_ok=True)
    (out_dir.parent / "verification.json").write_text(json.dumps(check, indent=2))
    if not check["ok"]:
        raise ConsolidateError(failure(check, out_dir))
    prec = check["precision"]
    log.info("Verified: max |log p| difference %.3g on the probe (%s, tolerance %g); trained in %s, written in %s "
             "(rounding moves log p by up to %.3g, not a fault)", check["max_abs_logprob_diff"], check["check"],
             check["tolerance"], prec["training"], prec["output"], max(prec["training_rounding"], prec["output_rounding"]))  # fmt: skip
    base_dir = None if model_cfg.source == "scratch" else root / paths.base_model_dir(model_cfg.model_dump())
    eos_id = set_generation_eos(model, tok, tpl.eos_token, base_dir)
    log.info("Saving the consolidated model to %s", out_dir)
    # (tied weights are stored once)
    weights = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    with room_for("consolidate", [out_dir], needed=lambda written: max(written, weights)):
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=cons.max_shard_size)
        tok.save_pretrained(out_dir)
        (out_dir / "README.md").write_text(model_card(cfg.sections, root, check))
    write_stage_config(cfg.sections, out_dir.parent)
    summary = {"eos_token_id": eos_id, "parameters": model.num_parameters(), "merged_lora": peft_cfg.method != "none",
               "verification": check}  # fmt: skip
    (out_dir.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
