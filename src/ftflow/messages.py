"""The normalized record: a conversation as a list of chat messages.

Every reader produces this form; pack consumes it. Validation happens here, once, so that a
broken conversation is rejected with the index of the message at fault.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A raw record that cannot become a conversation; `reason` is a short stable category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # None: the default policy (assistant turns are trained, others are not); True/False: forced.
    train: bool | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise RecordError("bad_role", f"role {self.role!r} is not one of {ROLES}")
        if not isinstance(self.content, str):
            raise RecordError("bad_content", f"{self.role} content is {type(self.content).__name__}, not str")

    @property
    def trained(self) -> bool:
        return self.role == "assistant" if self.train is None else self.train


def validate_conversation(messages: list[Message]) -> list[Message]:
    """Check the turn structure: optional system first, then user/assistant(/tool) turns."""
    if not messages:
        raise RecordError("empty", "conversation has no messages")
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise RecordError("bad_order", f"system message at index {i}; only index 0 may be system")
        if i and m.role == messages[i - 1].role and m.role in ("user", "assistant"):
            raise RecordError("bad_order", f"two consecutive {m.role} messages at index {i}")
    if not any(m.trained for m in messages):
        raise RecordError("no_target", "no message is trained on (no assistant turn)")
    if any(m.trained and not m.content.strip() for m in messages):
        raise RecordError("empty_target", "a trained message has empty content")
    return messages


def to_rows(messages: list[Message]) -> list[dict]:
    """Plain dicts for Arrow/Parquet (a list<struct> column)."""
    return [asdict(m) for m in messages]


def from_rows(rows: list[dict]) -> list[Message]:
    return [Message(**r) for r in rows]
