"""QLoRA's 4-bit base, in one place: train loads the base this way, and consolidate quantizes it
again the same way to check the adapter against train's logits."""

from __future__ import annotations

from ftflow.config.schema import Peft

# the first bitsandbytes whose CPU 4-bit path ftflow has run (tests/train/test_qlora.py); older
# ones may list the CPU among their devices without kernels that train
CPU_SINCE = (0, 50)


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
    since CPU_SINCE the CPU (slow, but the same quantization: the QLoRA path runs in the tests)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return set()
    import bitsandbytes
    from packaging.version import Version

    devices = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if Version(getattr(bitsandbytes, "__version__", "0")).release[:2] < CPU_SINCE:
        devices.discard("cpu")
    return devices


def plain_cpu_kernels(model):
    """Keep bitsandbytes' 4-bit layers on their dequantize-then-matmul path on CPU (the path CUDA
    hosts take too). On a CPU with AVX512-BF16 the first forward without gradients (a validation
    pass, the probe) otherwise repacks the weights for an inference kernel that has no backward:
    training after it would lose the gradients through every 4-bit layer (and the repacking
    needs layer widths that are multiples of 32)."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
