"""QLoRA's 4-bit base, in one place: train loads the base this way, and consolidate quantizes it
again the same way to check the adapter against train's logits."""

from __future__ import annotations

from ftflow.config.schema import Peft


def quantization_config(peft_cfg: Peft):
    """The QLoRA paper's recipe: NF4, the quantization constants quantized again, bf16 compute;
    None for any other method."""
    if peft_cfg.method != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def kbit_devices() -> set[str]:
    """The devices bitsandbytes has 4-bit kernels for (empty without bitsandbytes): CUDA, and
    since 0.48 the CPU (slow, but the same quantization: the QLoRA path runs in the tests)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return set()
    import bitsandbytes

    return set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
