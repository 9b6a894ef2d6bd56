"""The holdout task (eval.tasks: [holdout], eval=holdout): the model answers the test split's
conversations and is scored against their last assistant turns, with no task YAML to write.

For each conversation of results/normalize/test.parquet: the messages before its last assistant
turn are the prompt, rendered with the evaluated model's own chat template (the base with its
own, the tuned with the one it was trained with, as lm-eval's apply_chat_template does); the model
answers greedily, stopping at its end-of-turn tokens (`ftflow chat`'s generation, without
sampling: a score must not depend on luck); the answer is scored against the reference turn:

- exact_match: equal after trimming and collapsing whitespace
- rougeL: ROUGE-L F1 (Google's rouge-score; its tokenizer keeps Latin letters and digits only)
- chrf: chrF (sacrebleu, 0-100): character n-grams, meaningful for any script; the task's score
  is sacrebleu's corpus chrF (statistics summed over all answers), not the mean of the answers
- loss / perplexity: the mean negative log-likelihood per token of the reference turn itself,
  end-of-turn token included (teacher-forced, so it does not depend on the generation)

The scores join lm-eval's in metrics.json as <model>/holdout/<metric>; each model's answers are
written beside the references in <model>/holdout.jsonl for reading.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ftflow.errors import StageError
from ftflow.pack.io import template_message

log = logging.getLogger(__name__)

METRICS = ("exact_match", "rougeL", "chrf", "loss", "perplexity")


class HoldoutError(StageError):
    pass


@dataclass
class Example:
    id: str
    prompt: list[dict]  # chat-template messages before the last assistant turn
    reference: str  # that turn's text
    tools: list | None


def examples(path: Path, limit: int | None) -> list[Example]:
    """The test split's conversations that end in an assistant turn, split at that turn."""
    table = pq.read_table(path, columns=["id", "messages", "tools"])
    out = []
    for row in table.to_pylist()[:limit]:
        messages = [template_message(m) for m in row["messages"]]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or not messages[last].get("content"):
            continue  # nothing to compare an answer with (a tool-call-only turn)
        tools = json.loads(row["tools"]) if row["tools"] else None
        out.append(Example(row["id"], messages[:last], messages[last]["content"], tools))
    if not out:
        raise HoldoutError(f"eval task 'holdout': {path} holds no conversation ending in an assistant turn with text")
    return out


class Renderer:
    """Prompt and reference as text, with the model's chat template (or plainly, for a model
    whose tokenizer has none: a pretrained-only base, scored as lm-eval scores it)."""

    def __init__(self, tok, chat: bool):
        self.tok, self.chat = tok, chat

    def prompt(self, ex: Example) -> str:
        if self.chat:
            return self.tok.apply_chat_template(ex.prompt, tools=ex.tools, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in ex.prompt) + "assistant:"

    def full(self, ex: Example) -> str:
        turn = {"role": "assistant", "content": ex.reference}
        if self.chat:
            return self.tok.apply_chat_template([*ex.prompt, turn], tools=ex.tools, tokenize=False)
        return self.prompt(ex) + " " + ex.reference + (self.tok.eos_token or "")

    def ids(self, text: str) -> list[int]:
        # a chat template writes its own BOS into the text; a plain prompt gets the tokenizer's
        return self.tok(text, add_special_tokens=not self.chat)["input_ids"]


def reference_ids(r: Renderer, ex: Example, ends: set[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference-turn ids up to and including its end-of-turn token). The turn is
    what the full conversation adds to the prompt; a template that renders history differently
    from a prompt (not prefix-preserving) gets the reference's own tokens and an end token."""
    prompt, full = r.ids(r.prompt(ex)), r.ids(r.full(ex))
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        target = full[len(prompt) :]
    else:
        target = r.tok(ex.reference, add_special_tokens=False)["input_ids"] + sorted(ends)[:1]
    end = next((i for i, t in enumerate(target) if t in ends), None)
    return prompt, target if end is None else target[: end + 1]


def reference_loss(model, r: Renderer, batch: list[Example], ends: set[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the batch's reference turns, and their token count."""
    import torch

    pairs = [reference_ids(r, ex, ends) for ex in batch]
    width = max(len(p) + len(t) for p, t in pairs)
    pad = r.tok.pad_token_id if r.tok.pad_token_id is not None else 0
    ids = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, t) in enumerate(pairs):
        seq = p + t
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=-100, reduction="sum",
    )  # fmt: skip
    return nll.item(), int((labels != -100).sum())


def answers(model, r: Renderer, batch: list[Example], max_new_tokens: int, ends: set[int]) -> list[tuple[str, bool]]:
    """(answer text, whether it ended at an end-of-turn token) per example: greedy, batched."""
    import torch

    tok = r.tok
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(ends), 0)
    rows = [r.ids(r.prompt(ex)) for ex in batch]
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in rows])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=sorted(ends) or None, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)  # fmt: skip
    result = []
    for new in out[:, width:].tolist():
        end = next((i for i, t in enumerate(new) if t in ends), None)
        text = tok.decode(new if end is None else new[:end], skip_special_tokens=True).strip()
        result.append((text, end is not None))
    return result


def squashed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def text_scores(answer: str, reference: str, rouge) -> dict[str, float]:
    from sacrebleu.metrics import CHRF

    return {
        "exact_match": float(squashed(answer) == squashed(reference)),
        "rougeL": float(rouge.score(reference, answer)["rougeL"].fmeasure),
        "chrf": CHRF().sentence_score(answer, [reference]).score,
    }


def run(model, tok, chat: bool, ends: set[int], test: Path, cfg, out: Path) -> dict[str, float]:
    """Score one model on the holdout task; write its answers; return {metric: value}."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    exs, r = examples(test, cfg.limit), Renderer(tok, chat)
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    max_new = cfg.max_gen_toks or 256
    nll, tokens, lines, texts = 0.0, 0, [], []
    for start in range(0, len(exs), cfg.batch_size):
        batch = exs[start : start + cfg.batch_size]
        loss, n = reference_loss(model, r, batch, ends)
        nll, tokens = nll + loss, tokens + n
        for ex, (text, ended) in zip(batch, answers(model, r, batch, max_new, ends)):
            texts.append(text)
            lines.append({"id": ex.id, "prompt": ex.prompt, "reference": ex.reference, "answer": text,
                          "ended": ended, **text_scores(text, ex.reference, rouge)})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    with (out / "holdout.jsonl").open("w") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    cut = sum(not line["ended"] for line in lines)
    if cut:
        log.warning("holdout: %d of %d answers were cut at %d tokens (eval.max_gen_toks) before an end-of-turn token",
                    cut, len(lines), max_new)  # fmt: skip
    loss = nll / max(tokens, 1)
    return {
        "exact_match": sum(line["exact_match"] for line in lines) / len(lines),
        "rougeL": sum(line["rougeL"] for line in lines) / len(lines),
        "chrf": CHRF().corpus_score(texts, [[line["reference"] for line in lines]]).score,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
    }
