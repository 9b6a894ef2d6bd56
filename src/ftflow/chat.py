"""`ftflow chat [MODEL_DIR]`: talk to a model in the terminal, the quickest check of a fine-tune.

The model folder's own chat template renders the conversation and its own generation config
decides how to sample and where a turn ends (consolidate sets the template's end-of-turn token
as its eos), so what you see is what a user of the folder gets from `generate`. After each
answer a line on stderr says how it ended: at an end-of-turn token, or cut at
--max-new-tokens (a model that never learned to end its turn shows here first).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ftflow import paths
from ftflow.errors import StageError

MODEL = f"{paths.CONSOLIDATE}/model"  # what the workflow's consolidate stage writes


class ChatError(StageError):
    pass


@dataclass
class Reply:
    text: str
    tokens: int  # generated
    ended_at: str | None  # the end-of-turn token it stopped at; None: cut at max_new_tokens


def load(model_dir: Path):
    """The folder's tokenizer (with its chat template) and model, ready to generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ChatError(f"{model_dir} holds no model (no config.json): run the workflow (its consolidate stage "
                        f"writes {MODEL}) or name a model folder")  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise ChatError(f"{model_dir}: its tokenizer has no chat template, so there is no chat format to talk in")
    return tok, AutoModelForCausalLM.from_pretrained(model_dir).eval()


def end_tokens(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def reply(tok, model, messages: list[dict], max_new_tokens: int) -> Reply:
    """The model's next turn after `messages`, as its generation config samples it."""
    import torch
    from jinja2 import TemplateError

    try:
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    except TemplateError as err:  # e.g. a template without a system role (Gemma's)
        raise ChatError(f"the model's chat template refuses this conversation: {err}") from None
    ends = end_tokens(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(ends), None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    ended = tok.convert_ids_to_tokens(new[-1]) if new and new[-1] in ends else None
    return Reply(tok.decode(new, skip_special_tokens=True).strip(), len(new), ended)


def how_it_ended(r: Reply, max_new_tokens: int) -> str:
    if r.ended_at is not None:
        return f"[{r.tokens} tokens, ended at {r.ended_at}]"
    return f"[{r.tokens} tokens, cut at --max-new-tokens {max_new_tokens}: the model did not end its turn]"


def chat(model_dir: Path, system: str | None = None, max_new_tokens: int = 256, prompt: str | None = None) -> None:
    """One answer to `prompt`, printed; without one, a conversation until an empty line or EOF."""
    tok, model = load(model_dir)
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        turn(tok, model, messages, prompt, max_new_tokens)
        return
    print(f"Chatting with {model_dir} (its chat template); an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        turn(tok, model, messages, text, max_new_tokens, label="model> ")


def turn(tok, model, messages: list[dict], text: str, max_new_tokens: int, label: str = "") -> None:
    """Ask, print the answer (stdout) and how it ended (stderr), keep both in the conversation."""
    messages.append({"role": "user", "content": text})
    r = reply(tok, model, messages, max_new_tokens)
    messages.append({"role": "assistant", "content": r.text})
    print(label + r.text, flush=True)
    print(how_it_ended(r, max_new_tokens), file=sys.stderr, flush=True)
