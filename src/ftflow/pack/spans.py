"""Which characters of a rendered conversation carry loss, for any chat template.

The text is always what the template renders (so the token ids are exactly
`tokenizer.apply_chat_template(conv, tools=..., tokenize=True)`); only the way the trained
spans are found differs. For a tokenizer's own template (template=model), in this order:

  markers  the template marks its assistant output with {% generation %} (transformers' own
           assistant mask).
  twin     TRL ships a training twin of the template (`get_training_chat_template`): its
           {% generation %} spans are used on conversations where the twin renders exactly the
           original's text; a conversation where it does not is derived instead.
  derived  from the original template itself. For assistant turn i: P = the conversation up to
           turn i with the generation prompt, F = up to and including turn i; the span is
           F[len(P):] up to and including its end-of-turn token. Exact when P is a prefix of F
           and F a prefix of the whole conversation's text (the template is prefix-preserving
           for this conversation); otherwise the conversation is refused, with the reason.

Every span is checked on every conversation: it ends with an end-of-turn token and holds its
message's content. An end-of-turn token is one the model stops generating on (stop_tokens: the
tokenizer's eos and its generation config's eos ids), never just any special token: Command R7B
closes a turn with <|END_RESPONSE|><|END_OF_TURN_TOKEN|> and opens the next with the special
<|START_OF_TURN_TOKEN|>, which a span must not take. The first
conversation of every chunk is also derived from prefixes and must give the same spans, so a
twin or a marker block that strays into a prompt fails loudly. Nothing ever falls back to an
all-zero or all-one mask.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ftflow.errors import StageError

ASSISTANT = "assistant"


class TemplateError(StageError):
    """A template whose trained spans cannot be found exactly, with the reason and the choices."""


CHOICES = "or use template=chatml or template=llama3 (ftflow's templates, with exact spans)"


@dataclass
class Span:
    start: int
    end: int
    role: str  # the role of the message whose tokens these are


@dataclass
class Renderer:
    """Renders conversations with one template and finds their trained spans."""

    template: str  # the template whose text is trained on
    method: str  # ftflow | markers | twin | derived
    source: str  # where the template came from (the tokenizer's path), for messages
    tokens: dict  # the special tokens the template sees (bos_token, eos_token, ...)
    end_tokens: tuple[str, ...]  # the tokens that end a turn: what the model stops on (stop_tokens)
    special: tuple[str, ...]  # every special token of the tokenizer (the next turn's header among them)
    twin: str | None = None

    def text(self, conv: list[dict], tools, add_generation_prompt: bool = False, template: str | None = None,
             spans: bool = False):  # fmt: skip
        from transformers.utils.chat_template_utils import render_jinja_template

        texts, generation = render_jinja_template(
            conversations=[conv], tools=tools, chat_template=template or self.template,
            add_generation_prompt=add_generation_prompt, return_assistant_tokens_mask=spans, **self.tokens,
        )  # fmt: skip
        return (texts[0], [tuple(s) for s in generation[0]]) if spans else texts[0]

    def render(self, conv: list[dict], tools, train_on: str, where: str, check: bool = False) -> tuple[str, list[Span]]:
        """The conversation's text and its trained spans (train_on: assistant | last_assistant | all).
        `where` names the conversation in errors; `check` also derives it from prefixes. A refusal
        names the train_on choices that were tried on this conversation and work."""
        try:
            return self.guarded(where, self._render, conv, tools, train_on, where, check)
        except TemplateError as err:
            raise TemplateError(f"{err}; {self.choices(conv, tools, train_on, where)}") from None

    def whole(self, conv: list[dict], tools, where: str, check: bool) -> tuple[str, list[Span]]:
        """render(train_on=assistant) without the choices a refusal names (auto tries per turn next)."""
        return self._render(conv, tools, "assistant", where, check)

    def render_turns(self, conv: list[dict], tools, where: str) -> list[tuple[str, str, str]]:
        """(prompt, turn, role) per trained message: pack.train_on=each_turn (see each_turn)."""
        try:
            return self.guarded(where, self.each_turn, conv, tools, trained_messages(conv, "assistant"), where)
        except TemplateError as err:
            raise TemplateError(f"{err}; {self.choices(conv, tools, 'each_turn', where)}") from None

    def guarded(self, where: str, fn, *args):
        """fn(*args), where the template's own failure is a TemplateError naming the conversation."""
        try:
            return fn(*args)
        except TemplateError:
            raise
        except Exception as err:  # the template itself fails (raise_exception, a role it does not know, ...)
            raise TemplateError(f"{self.source}: {where}: the chat template cannot render this conversation: "
                                f"{type(err).__name__}: {err}") from None  # fmt: skip

    def choices(self, conv, tools, train_on: str, where: str) -> str:
        """What trains this conversation instead, each checked on it: one sequence per turn, the
        last turn only; or ftflow's templates."""
        works = []
        if train_on != "each_turn":
            try:
                self.guarded(where, self.each_turn, conv, tools, trained_messages(conv, "assistant"), where)
                works.append("pack.train_on=each_turn (or auto) trains it exactly, one sequence per turn, each as "
                             "the model sees it at inference")  # fmt: skip
            except TemplateError:
                pass
        if train_on not in ("last_assistant", "all") and not works:
            try:
                self.guarded(where, self._render, conv, tools, "last_assistant", where, False)
                works.append("pack.train_on=last_assistant trains its last turn exactly")
            except TemplateError:
                pass
        return "; ".join(works + [CHOICES if works else CHOICES.removeprefix("or ")])

    def _render(self, conv, tools, train_on, where, check):
        # a template with markers gives its text and its spans in one rendering
        text, marks = self.text(conv, tools, spans=True) if self.method == "markers" else (self.text(conv, tools), None)
        if train_on == "all":
            return text, [Span(0, len(text), "all")]
        wanted = trained_messages(conv, train_on)
        if self.method == "markers":
            spans = self.marked(text, conv, marks, where)
        elif self.method == "twin":
            twin_text, twin_spans = self.text(conv, tools, template=self.twin, spans=True)
            if twin_text == text and len(twin_spans) == sum(m["role"] == ASSISTANT for m in conv):
                spans = self.marked(text, conv, twin_spans, where)
            else:
                spans = self.derived(conv, tools, text, wanted, where)
        else:
            spans = self.derived(conv, tools, text, wanted, where)
        spans = {i: s for i, s in spans.items() if i in wanted}
        for i in wanted - set(spans):  # a non-assistant message marked train=True
            spans.update(self.derived(conv, tools, text, {i}, where))
        if check and self.method in ("markers", "twin"):
            self.agree(conv, tools, text, wanted, spans, where)
        for i, s in spans.items():
            self.check_span(text, s, conv[i], i, where)
        return text, [spans[i] for i in sorted(spans)]

    # --- the three ways ---------------------------------------------------------------------

    def marked(self, text: str, conv: list[dict], text_spans: list, where: str) -> dict[int, Span]:
        """{% generation %} blocks, one per assistant message in order, trimmed to the turn: from
        the end of the generation prompt (a twin may open its block before the prompt's last
        newline) to the end of the end-of-turn token (it may close after the newline that follows)."""
        assistants = [i for i, m in enumerate(conv) if m["role"] == ASSISTANT]
        if len(text_spans) != len(assistants):
            raise TemplateError(
                f"{self.source}: {where}: the template marks {len(text_spans)} {{% generation %}} blocks for "
                f"{len(assistants)} assistant messages"
            )
        out = {}
        for i, (a, b) in zip(assistants, text_spans):
            end = self.turn_end(text, a, b)
            out[i] = Span(self.after_prompt(text, a), b if end is None else end, ASSISTANT)
        return out

    def derived(self, conv: list[dict], tools, text: str, wanted: set[int], where: str) -> dict[int, Span]:
        out = {}
        for i in sorted(wanted):
            role = conv[i]["role"]
            before, upto, end, end_alone = self.turn(conv, tools, i, where)
            # the turn as the template closes it when the conversation goes on; else as this
            # conversation renders it (its last message, which nothing rewrites)
            if end is None or not text.startswith(upto[:end]):
                end = end_alone if text.startswith(upto) else None
            if end is None and end_alone is None:
                raise self.not_closed(upto[len(before) :], i, role, where)
            if end is None:
                at = next((k for k, (x, y) in enumerate(zip(upto, text)) if x != y), min(len(upto), len(text)))
                raise TemplateError(
                    f"{self.source}: {where}: the template is not prefix-preserving here: message {i} ({role}) "
                    f"renders differently once later messages follow ({upto[max(0, at - 30) : at + 30]!r} alone, "
                    f"{text[max(0, at - 30) : at + 30]!r} in the whole conversation)"
                )
            out[i] = Span(len(before), end, role)
        return out

    def each_turn(self, conv: list[dict], tools, wanted: set[int], where: str) -> list[tuple[str, str, str]]:
        """(prompt, turn, role) for each trained message i, one training sequence each, exactly as
        inference sees it: the prompt is conversation[:i] rendered with the generation prompt (what
        the model is given), the turn is message i as the template renders it when it is the
        conversation's last (reasoning included where the template renders it there), up to and
        including its end-of-turn token (what the model generates before it stops). Needs no prefix
        preservation across turns: Qwen3's, QwQ's or Mistral's templates, which render a turn
        differently once later messages follow, train each turn as it is generated."""
        out = []
        for i in sorted(wanted):
            role = conv[i]["role"]
            before, upto, end, end_alone = self.turn(conv, tools, i, where, generated=True)
            end = end if end is not None else end_alone
            if end is None:
                self.check_content(upto[len(before) :], conv[i], i, where)  # the likelier reason first
                raise self.not_closed(upto[len(before) :], i, role, where)
            self.check_span(upto, Span(len(before), end, role), conv[i], i, where)
            out.append((before, upto[len(before) : end], role))
        return out

    def turn(
        self, conv: list[dict], tools, i: int, where: str, generated: bool = False
    ) -> tuple[str, str, int | None, int | None]:
        """Message i as the conversation's last: the text before it (an assistant's with the
        generation prompt), the text up to and including it, and where its end-of-turn token ends
        in that text: as the template closes the turn when a user message follows, and as it
        stands (None where there is none). `generated`: a turn after a generation prompt that
        differs from the turn's prompt is the turn as the model writes it there (generated)."""
        role = conv[i]["role"]
        before = self.before(conv, tools, i)
        upto = self.text(conv[: i + 1], tools)
        # some templates add a suffix after the conversation's last message (Phi-3's eos), which
        # is not the turn's: `closed` cuts it
        closed, rendered = self.closed(conv[: i + 1], tools, upto), upto
        if generated and role == ASSISTANT and not upto.startswith(before):
            made = self.generated(before, upto, conv, tools, i)
            if made is not None:  # it ends like upto: cut the same suffix
                upto, closed = made, made[: len(made) - (len(upto) - len(closed))]
        if not upto.startswith(before):
            what = "the generation prompt" if role == ASSISTANT else "the conversation before it"
            raise TemplateError(f"{self.source}: {where}: message {i} ({role}) does not start with {what} "
                                f"({before[-40:]!r} is not a prefix of {upto[-80:]!r})")  # fmt: skip
        end, end_alone = self.last_end(closed, len(before)), self.last_end(upto, len(before))
        if end is None and end_alone is None and (stop := self.header_stop(conv, tools, i, rendered)):
            # no end-of-turn token of its own: the model stops on the next message's header (GLM's
            # <|user|>, <|observation|> after a tool call: its generation config lists them), so
            # the turn ends with that token (after the turn as it stands where the continued
            # conversation renders it differently: GLM drops an earlier turn's reasoning)
            turn = closed if self.only_markers(upto[len(closed) :]) else upto
            return before, turn + stop, len(turn) + len(stop), None
        return before, upto, end, end_alone

    def header_stop(self, conv: list[dict], tools, i: int, upto: str) -> str | None:
        """The stop token that opens the header of the message after message i (a user message
        after the last one): right after the turn where the next message leaves the turn as it
        is, else just before the next message's content, with nothing but markers between."""
        following = conv[i + 1] if i + 1 < len(conv) else {"role": "user", "content": "\u2026"}
        try:
            more = self.text(conv[: i + 1] + [following], tools)
        except Exception:  # a template that refuses this order
            return None
        if more.startswith(upto):
            return next((t for t in self.end_tokens if more[len(upto) :].startswith(t)), None)
        content = following.get("content")  # the turn renders differently once the next one follows
        if not isinstance(content, str) or not content.strip():
            return None
        start = more.rfind(content)
        found = [(more.rfind(t, 0, start), t) for t in self.end_tokens if more.rfind(t, 0, start) >= 0]
        if not found:
            return None
        at, stop = max(found)
        return stop if self.only_markers(more[at + len(stop) : start]) else None

    def generated(self, before: str, upto: str, conv: list[dict], tools, i: int) -> str | None:
        """The conversation up to turn i as inference makes it, where the template renders the
        turn's prompt differently from its generation prompt: `before`, then the turn as the
        model writes it there. None where neither case below holds (the turn is refused)."""
        shared = next((k for k, (x, y) in enumerate(zip(before, upto)) if x != y), min(len(before), len(upto)))
        inside = re.search(r"<[^<>\s]*$", before[:shared])
        if inside:  # they part inside a tag ('<think>' / '</think>'): from its start
            shared = inside.start()
        extra, rest = before[shared:], upto[shared:]
        try:  # this conversation's generation prompt (a tool-use template renders none without tools)
            plain = self.text(conv[:i], tools)
        except Exception:
            plain = ""
        prompt = before[len(plain) :] if plain and before.startswith(plain) else self.generation_prompt
        tag = re.fullmatch(r"\s*<(\w+)>\s*", extra)
        if tag and f"</{tag[1]}>" in self.template:
            # QwQ's, DeepSeek-R1's, MiniMax-M2's generation prompt opens the reasoning block
            # ('<|im_start|>assistant\n<think>\n') that their rendering of an answer leaves out:
            # the model writes its reasoning, closes the block, answers (Qwen3's spacing; empty
            # reasoning for an answer without any). GLM-4.7 renders the answer as '</think>...'.
            reasoning = (conv[i].get("reasoning_content") or "").strip("\n")
            close = "" if rest.startswith(f"</{tag[1]}>") else f"\n</{tag[1]}>\n\n"
            return f"{before}{reasoning}{close}{rest.lstrip() if close else rest}"
        if extra and self.only_markers(extra) and prompt.endswith(extra) and len(extra) < len(prompt):
            # Gemma 4's generation prompt ends with an empty thinking channel
            # ('<|turn>model\n<|channel>thought\n<channel|>') that a rendered answer does not have
            # after its header: the model is given it and writes the answer
            return before + rest
        return self.moved_prompt(before, upto, conv, i, shared)

    def only_markers(self, text: str) -> bool:
        """Special tokens, whitespace and at most one plain word between them (a channel name; not
        a tag such as </think>, whose block the text would open or close)."""
        for token in self.special:
            text = text.replace(token, " ")
        words = text.split()
        return len(words) <= 1 and not any("<" in w or ">" in w for w in words)

    def moved_prompt(self, before: str, upto: str, conv: list[dict], i: int, shared: int) -> str | None:
        """Mistral's templates render the system prompt before the last user message only: the
        generation prompt has it there, the conversation that goes on to the answer does not (and
        Hermes' tool-use template puts a newline after a tool result there but not in its
        generation prompt). What the model is given differs earlier on, and the turn itself is the
        same: the text from the answer's own content on, where both end alike before it from the
        previous message on, or from where they part on. Cohere's tool-use template, which adds
        an instruction turn to its generation prompt only, is refused."""
        content, previous = conv[i].get("content") or "", conv[i - 1].get("content") if i else None
        at = upto.rfind(content) if isinstance(content, str) and content.strip() else -1
        if at < 0 or not isinstance(previous, str) or not previous.strip():
            return None
        common = 0
        while common < min(at, len(before)) and before[-1 - common] == upto[at - 1 - common]:
            common += 1
        # both end alike from the previous message on, or from where they part on (a newline)
        alike = previous.rstrip() in before[len(before) - common :] or len(before) - shared <= common
        return before + upto[at:] if alike else None

    def not_closed(self, turn: str, i: int, role: str, where: str) -> TemplateError:
        return TemplateError(f"{self.source}: {where}: message {i} ({role}) is not closed by an end-of-turn token "
                             f"({turn[-60:]!r}; {self.stops_said}): the model would never learn to stop")  # fmt: skip

    def closed(self, conv: list[dict], tools, upto: str) -> str:
        """The text of `conv` up to where it and the same conversation followed by a user turn
        agree: what follows the last message only because the conversation ends is cut."""
        try:
            more = self.text(conv + [{"role": "user", "content": "\u2026"}], tools)
        except Exception:  # a template that refuses this order (e.g. user after tool): keep the text as is
            return upto
        n = next((k for k, (x, y) in enumerate(zip(upto, more)) if x != y), min(len(upto), len(more)))
        return upto[:n]

    def before(self, conv: list[dict], tools, i: int) -> str:
        """The text before message i (an assistant's with the generation prompt)."""
        try:
            return self.text(conv[:i], tools, add_generation_prompt=conv[i]["role"] == ASSISTANT)
        except Exception:  # many templates cannot render no message at all
            if i:
                raise
            return ""

    def agree(self, conv, tools, text, wanted, spans, where) -> None:
        """The spans of the markers or the twin must be those derived from prefixes (where the
        conversation can be derived at all)."""
        try:
            derived = self.derived(conv, tools, text, set(spans), where)
        except TemplateError:
            return
        for i, s in spans.items():
            d = derived[i]
            if (s.start, s.end) != (d.start, d.end):
                raise TemplateError(
                    f"{self.source}: {where}: the {self.method} spans of message {i} ({text[s.start : s.end][:60]!r}...) "
                    f"differ from the ones derived from the template's own prefixes ({text[d.start : d.end][:60]!r}...)"
                )

    # --- span edges -------------------------------------------------------------------------

    def turn_end(self, text: str, start: int, end: int) -> int | None:
        """The end of the end-of-turn token that closes text[start:end], trailing whitespace aside."""
        stripped = text[start:end].rstrip()
        for token in self.end_tokens:
            if stripped.endswith(token):
                return start + len(stripped)
        return None

    def last_end(self, text: str, start: int) -> int | None:
        """The end of the last end-of-turn token in text[start:], when all that follows it is
        whitespace or the next turn's header: a special token, or the start of one where `closed`
        cut the text inside it (Command R7B's `<|START_OF_TURN_TOKEN|><|`)."""
        ends = [text.rfind(t, start) + len(t) for t in self.end_tokens if text.rfind(t, start) >= 0]
        if not ends:
            return None
        end = max(ends)
        rest = text[end:].strip()
        opens_header = any(rest.startswith(t) or t.startswith(rest) for t in self.special)
        return end if not rest or opens_header else None

    def after_prompt(self, text: str, start: int) -> int:
        prompt = self.generation_prompt
        for p in range(start, min(start + len(prompt), len(text)) + 1):
            if prompt and text[:p].endswith(prompt):
                return p
        return start

    @property
    def stops_said(self) -> str:
        """The end-of-turn tokens, as errors name them (with where they come from)."""
        return (f"the model stops on {', '.join(self.end_tokens) or 'nothing'}: the tokenizer's eos and the eos ids "
                "of the generation_config.json beside it")  # fmt: skip

    @property
    def generation_prompt(self) -> str:
        if not hasattr(self, "_prompt"):
            probe = [{"role": "user", "content": "x"}]
            try:
                plain, prompted = self.text(probe, None), self.text(probe, None, add_generation_prompt=True)
                self._prompt = prompted[len(plain) :] if prompted.startswith(plain) else ""
            except Exception:  # a template that cannot render the probe has no usable prompt here
                self._prompt = ""
        return self._prompt

    def check_span(self, text: str, s: Span, message: dict, i: int, where: str) -> None:
        body = text[s.start : s.end]
        if self.turn_end(text, s.start, s.end) != s.end:
            raise TemplateError(f"{self.source}: {where}: the trained span of message {i} ({s.role}) does not end "
                                f"with an end-of-turn token ({body[-60:]!r}; {self.stops_said}): the model would never "
                                "learn to stop")  # fmt: skip
        self.check_content(body, message, i, where)

    def check_content(self, body: str, message: dict, i: int, where: str) -> None:
        content = message.get("content")
        if isinstance(content, str) and content.strip() and content.strip() not in body:
            raise TemplateError(f"{self.source}: {where}: the template does not render message {i}'s content inside "
                                f"its trained span (it drops or rewrites it): {body[:80]!r}")  # fmt: skip
        for call in message.get("tool_calls") or []:  # a template without tool support drops them
            name = call["function"]["name"]
            if name not in body:
                raise TemplateError(f"{self.source}: {where}: the template does not render message {i}'s tool call "
                                    f"{name!r} inside its trained span ({body[:80]!r}): training would teach an answer "
                                    "without the call; use a template that renders tool calls, or data without them")  # fmt: skip


def trained_messages(conv: list[dict], train_on: str) -> set[int]:
    """Indices of the messages that carry loss: assistant turns, unless a message's `train` flag
    says otherwise; last_assistant keeps the last of them."""
    flagged = [i for i, m in enumerate(conv) if (m["role"] == ASSISTANT if m.get("train") is None else m["train"])]
    return set(flagged[-1:]) if train_on == "last_assistant" else set(flagged)


def has_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def training_twin(tok) -> str | None:
    """TRL's training twin of the tokenizer's template, if TRL knows the template."""
    try:
        from trl.chat_template_utils import get_training_chat_template

        return get_training_chat_template(tok)
    except Exception:  # TRL refuses templates it does not know (ValueError) or cannot probe
        return None


def special_tokens(tok) -> tuple[str, ...]:
    """The tokenizer's special tokens (added tokens marked special, eos among them), longest
    first so that one token is not taken for a shorter one it ends with."""
    special = set(tok.all_special_tokens)
    special |= {t.content for t in tok.added_tokens_decoder.values() if t.special}
    return tuple(sorted((t for t in special if t), key=len, reverse=True))


def stop_tokens(tok) -> tuple[str, ...]:
    """The tokens that end a trained turn: those the model stops generating on, as consolidate
    writes them into the tuned model's generation config and evaluate stops on them. The
    tokenizer's eos, and the eos ids of the generation config in the folder the tokenizer was
    loaded from (the base model's: Gemma's <end_of_turn>, Llama 3's <|eot_id|> and <|eom_id|>,
    Phi-3's <|end|> are there and not the tokenizer's eos). Longest first."""
    stops = {tok.eos_token} if tok.eos_token else set()
    config = Path(str(getattr(tok, "name_or_path", "") or "")) / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        stops |= {t for t in tok.convert_ids_to_tokens(ids) if t}
    return tuple(sorted(stops, key=len, reverse=True))


def renderer(tok, method: str | None = None) -> Renderer:
    """The renderer of the tokenizer's template, with the first method that applies."""
    template = tok.chat_template
    if isinstance(template, dict):
        template = template["default"]
    source = str(getattr(tok, "name_or_path", "") or "the tokenizer")
    if not template:
        raise TemplateError(f"{source}: template=model, but the tokenizer has no chat template; use template=chatml")
    twin = None
    if method is None:
        if has_markers(template):
            method = "markers"
        else:
            twin = training_twin(tok)
            method = "twin" if twin else "derived"
    return Renderer(template, method, source, dict(tok.special_tokens_map), stop_tokens(tok), special_tokens(tok), twin)
