"""benchmarks/gpu/bench.py, the one script a GPU box runs (README: GPU): its FLOPs count against
the real architectures, its data, and its attention adapter. (tests/test_gpu_run.py runs the
whole script on CPU, as the GPU machine's packages would have it, so that it cannot rot between
GPU runs.)"""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import bench  # noqa: E402


def model_of(shape: str, device: str = "meta"):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(bench.SHAPES[shape])
    config = AutoConfig.for_model(vocab_size=arch.pop("vocab"), **arch)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("shape", list(bench.SHAPES))
def test_the_flops_count_has_every_matmul_weight_of_the_architecture(shape):
    """N in the MFU formula is the weights of the model's Linear layers (the output layer
    counted although tied to the embedding: its matmul still runs), read off the model
    transformers builds from the shape (on the meta device: no memory)."""
    model = model_of(shape)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench.matmul_weights(bench.SHAPES[shape]) == linear
    if shape == "llama-1b":  # Llama-3.2-1B has 1.24B parameters, its embedding 263M of them
        assert model.num_parameters() == 1_235_814_400


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen"])
def test_the_lora_count_is_what_peft_trains(shape):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model_of(shape, "cpu"), LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert bench.lora_weights(bench.SHAPES[shape], 16) == trainable


def test_the_attention_term_counts_each_conversation_not_the_row():
    """c = sum(s^2)/sum(s): a row of one 4096-token conversation attends 8x further on average
    than a row of eight 512-token ones; full fine-tuning is 6N plus 6 L d c."""
    one, eight = bench.attention_context([[4096]]), bench.attention_context([[512] * 8])
    assert (one, eight) == (4096, 512)
    arch = bench.SHAPES["llama-1b"]
    n, layers, d = bench.matmul_weights(arch), arch["num_hidden_layers"], 32 * 64
    assert bench.flops_per_token(arch, 512, "full") == 6 * n + 6 * layers * d * 512
    assert bench.flops_per_token(arch, 512, "lora") == 4 * n + 6 * bench.lora_weights(arch, 16) + 6 * layers * d * 512


def test_packed_rows_are_full_and_mark_each_conversations_start():
    data = bench.packed_rows(rows=3, max_length=4096, vocab=128256)
    for ids, labels, lengths in zip(data["input_ids"], data["labels"], data["seq_lengths"]):
        assert len(ids) == len(labels) == sum(lengths) == 4096 and len(lengths) > 1
        starts = {int(x) for x in torch.tensor([0, *lengths[:-1]]).cumsum(0)}
        assert {i for i, v in enumerate(labels) if v == -100} == starts
        assert 2 <= min(ids) and max(ids) < 128256


def test_the_torch_varlen_adapter_keeps_packed_conversations_apart():
    """The adapter that makes PyTorch's varlen flash kernel (CUDA only) an attention
    implementation, with a per-conversation causal sdpa standing in for the kernel: the
    conversation bounds it derives from the position ids, its grouped-query heads and its
    output layout give a packed row exactly its conversations' logits alone, and the same
    logits as sdpa (the kernel's contract: causal attention within [bounds[i], bounds[i+1]))."""
    import torch.nn.functional as F

    calls = []

    def kernel(q, k, v, bounds, bounds_k, longest_q, longest_k, scale=None, is_causal=False):
        calls.append(bounds.tolist())
        assert is_causal and bounds.dtype == torch.int32 and longest_q == max(torch.diff(bounds).tolist())
        parts = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                scale=scale).transpose(0, 1)
                 for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]  # fmt: skip
        return torch.cat(parts)

    assert bench.register_torch_varlen(kernel)
    model = model_of("tiny-llama", "cpu").eval()  # 4 query heads over 2 key/value heads
    lengths = [5, 11, 3, 9]
    ids = torch.randint(2, 512, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    reference = bench.alone_logits(model, ids, lengths)
    for impl in ("torch_varlen", "sdpa"):
        result = bench.check_attention(model, impl, ids, positions, lengths, reference, iters=0)
        assert result["correct"] and result["max_abs_error_packed"] < 1e-5, (impl, result)
    # the adapter ran (once per layer and forward): the packed row's bounds, then each conversation's
    assert [0, 5, 16, 19, 28] in calls and [0, 5] in calls
