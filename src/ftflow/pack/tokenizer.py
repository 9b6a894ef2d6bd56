"""The tokenizer pack uses and saves: the base model's (with the chat template's marker tokens
added where its vocabulary lacks them), or, for a model trained from scratch
(tokenizer.source=train), a byte-level BPE trained here on the rendered training conversations."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ftflow import paths
from ftflow.config.schema import Model, Template, Tokenizer
from ftflow.errors import PackError
from ftflow.pack.encode import span_method
from ftflow.pack.io import data_kind, messages_of, piece_table, pieces, tools_of
from ftflow.pack.templates import TEMPLATES, template_text

log = logging.getLogger(__name__)


PAD_TOKEN = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str], cfg: Tokenizer, eos_token: str, markers=("<|im_start|>",)
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: no unknown tokens) trained on the rendered conversations."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([PAD_TOKEN, *markers, eos_token]))
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(map(cut_long_runs, texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos_token, pad_token=PAD_TOKEN)


LONG_RUN = re.compile(r"\S{256}")


def cut_long_runs(text: str) -> str:
    """The text as the tokenizer trainer sees it: a space after every 256 characters of an
    unbroken run. BPE training costs grow with the square of a word's length (a 200,000-character
    run took 17 s, a 1M one minutes); merges are learnt from words far shorter than 256."""
    return LONG_RUN.sub(r"\g<0> ", text) if len(text) > 256 else text


def render(convs: list[list[dict]], template: str, tools: list | None = None, **tokens) -> list[str]:
    """Rendered text, before a tokenizer exists (to train one): a shipped template's Python
    twin when there is one, else transformers' Jinja renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from ftflow.pack import templates

    tools = tools or [None] * len(convs)
    twin = next((fn for name, fn in templates.FAST.items() if template == template_text(name)), None)
    if twin is not None:
        return [twin(c, t, tokens.get("bos_token", ""))[0] for c, t in zip(convs, tools)]
    return [render_jinja_template(conversations=[c], tools=t, chat_template=template, **tokens)[0][0]
            for c, t in zip(convs, tools)]  # fmt: skip


def training_texts(parquet: Path, template: str, bos: str) -> Iterator[str]:
    """What a tokenizer trained for this data should see, piece by piece (memory stays bounded):
    the rendered conversations (for preference and prompt data, the prompt and its first
    completion), or the raw text."""
    kind = data_kind(parquet)
    first = {"preference": "chosen", "unpaired": "completion"}.get(kind)
    for piece in pieces(parquet):
        if kind == "text":
            yield from piece_table(parquet, piece, ["text"]).column("text").to_pylist()
            continue
        table = piece_table(parquet, piece, None)
        if kind == "conversation":
            convs = messages_of(table.column("messages"))
        else:
            convs = messages_of(table.column("prompt"))
            if first:
                convs = [p + c for p, c in zip(convs, messages_of(table.column(first)))]
        yield from render(convs, template, tools_of(table), bos_token=bos)


def build_tokenizer(model: Model, tok_cfg: Tokenizer, tpl: Template, parquet: Path, root: Path):
    """The tokenizer every later stage uses, with the chat template set on it."""
    named = TEMPLATES.get(tpl.name)
    if tok_cfg.source == "train":
        texts = training_texts(parquet, template_text(tpl.name), named.bos or "")
        log.info("Training a byte-level BPE tokenizer <vocab_size=%d> on the training split", tok_cfg.vocab_size)
        tok = train_tokenizer(texts, tok_cfg, tpl.eos_token, named.markers)
    else:
        src = root / paths.base_model_dir(model.model_dump())
        if not src.is_dir():
            raise PackError(f"{src}: the base model was never downloaded: run `ftflow download`, or `ftflow run`, "
                            "which downloads first")  # fmt: skip
        log.info("Loading the tokenizer of <%s>", src)
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model.trust_remote_code)
    if named is not None:
        tok.chat_template = template_text(tpl.name)
        missing = [t for t in named.markers if t not in tok.get_vocab()]
        if missing:  # the base vocabulary lacks the template's markers; train resizes the embeddings
            tok.add_special_tokens({"additional_special_tokens": missing})
        if named.bos:
            tok.bos_token = named.bos
        tok.eos_token = tpl.eos_token
    else:  # the model's own template, unchanged: its spans are found and verified (spans.py)
        log.info("Chat template of <%s>: trained spans by %s", tok.name_or_path, span_method(tok))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
