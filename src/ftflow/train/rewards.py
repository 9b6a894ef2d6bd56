"""GRPO reward functions, chosen by config (train.grpo.rewards).

A reward function takes TRL's keyword arguments — `completions` (decoded text), `prompts`, and
every other column of the dataset, here `answer` (the reference answer of prompt data) — and
returns one float per completion (None: no opinion, TRL then ignores it for that sample).

User rewards are "file.py:function" with the file under conf/train/, loaded like user readers:

    # conf/train/my_rewards.py
    def brevity(completions, **kwargs):
        return [1.0 / (1 + len(c.split())) for c in completions]
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

from ftflow import paths
from ftflow.config.schema import Reward
from ftflow.data.readers import load_function

REWARDS_DIR = Path(paths.REWARDS)  # user reward files are resolved from here


def _normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(completions: list[str], answer: list[str | None], **_) -> list[float | None]:
    """1.0 when the completion, trimmed and case-folded, is the reference answer."""
    return [None if a is None else float(_normalize(c) == _normalize(a)) for c, a in zip(completions, answer)]


def regex_match(completions: list[str], answer: list[str | None], pattern: str, **_) -> list[float | None]:
    """1.0 when `pattern`'s first group (or whole match) in the completion is the answer: for
    completions that reason first and answer in a fixed form (e.g. '#### (\\S+)'). A reference
    that the pattern matches too (a GSM8K solution ending in '#### 42') is reduced the same way
    first, so the worked solution is not compared with the completion's number."""
    regex = re.compile(pattern)

    def extract(text: str) -> str | None:
        m = regex.search(text)
        return (m.group(1) if m.groups() else m.group(0)) if m else None

    out: list[float | None] = []
    for c, a in zip(completions, answer):
        if a is None:
            out.append(None)
            continue
        got, want = extract(c), extract(a) or a
        out.append(float(got is not None and _normalize(got) == _normalize(want)))
    return out


BUILTIN: dict[str, Callable] = {"exact_match": exact_match, "regex_match": regex_match}


def reward_function(reward: Reward, base: Path = REWARDS_DIR) -> Callable:
    """One configured reward, named so that TRL logs it as rewards/<name>."""
    if reward.name in BUILTIN:
        fn = BUILTIN[reward.name]
        if reward.name == "regex_match":
            if not reward.pattern:
                raise ValueError("reward regex_match needs a `pattern`")
            fn = functools.partial(fn, pattern=reward.pattern)
    elif reward.pattern is not None:
        raise ValueError(f"reward {reward.name!r}: `pattern` is for regex_match")
    else:
        fn = load_function(reward.name, base, what="reward")

    @functools.wraps(fn if not isinstance(fn, functools.partial) else fn.func)
    def named(*args, **kwargs):
        return fn(*args, **kwargs)

    named.__name__ = reward.name.rsplit(":", 1)[-1]
    return named


def reward_functions(rewards: list[Reward], base: Path = REWARDS_DIR) -> list[Callable]:
    return [reward_function(r, base) for r in rewards]
