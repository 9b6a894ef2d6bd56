"""evaluate's task loading and metric flattening (the lm-eval run itself is in test_workflow)."""

from __future__ import annotations

import pytest

from ftflow.evaluate import flat_scores, task_config, task_data_files

from conftest import REPO


def test_shipped_task_resolves_its_data_files_against_the_root(tmp_path):
    task = task_config("demo_words", REPO)
    assert task["task"] == "demo_words" and task["output_type"] == "generate_until"
    assert task["dataset_kwargs"]["data_files"]["test"] == str(REPO / "examples/demo/test.jsonl")
    assert task_data_files(["demo_words"], REPO) == ["examples/demo/test.jsonl"]


def test_unknown_task_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"eval task 'nope'.*shipped tasks: \['demo_words', 'demo_words_choice'\]"):
        task_config("nope", REPO)


def test_flat_scores_drop_stderr_and_bookkeeping():
    results = {"results": {"t": {"alias": "t", "exact_match,none": 0.5, "exact_match_stderr,none": 0.1, "sample_len": 8}}}
    assert flat_scores("tuned", results) == {"tuned/t/exact_match": 0.5}


def test_base_with_a_smaller_vocabulary_is_resized_like_train_does(tmp_path):
    """A hub base without the template's marker tokens: pack added them, train resized the
    embeddings, and the base evaluation must accept the same token ids."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ftflow.evaluate import load_for_eval

    vocab = {f"w{i}": i for i in range(40)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), unk_token="w0")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(tmp_path / "tok")
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    lm = load_for_eval(tmp_path / "base", tmp_path / "tok", batch_size=4)
    assert lm.model.get_input_embeddings().num_embeddings == len(tok) == 42


def test_vllm_backend_without_vllm_is_a_clear_error():
    from ftflow.evaluate import EvaluateError, eval_backend

    assert eval_backend("auto") == "hf"  # no vLLM / GPU here
    with pytest.raises(EvaluateError, match=r"eval.backend=vllm needs vLLM installed .* use eval.backend=hf"):
        eval_backend("vllm")
