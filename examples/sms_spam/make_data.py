"""The SMS spam task: is this text message spam? From the SMS Spam Collection v.1, shipped here
as published (SMSSpamCollection: one `ham|spam<TAB>message` line per SMS, UTF-8, no header).

    python examples/sms_spam/make_data.py   # rewrites train.jsonl and test.jsonl (same bytes)

The messages are real (a UK forum, a Singapore corpus, Caroline Tag's thesis, the Grumbletext
spam site), which makes the task a test of what a pretrained chat model brings: a model must read
the text, it cannot learn a rule. Records are in the alpaca format with the same instruction for
every message and the answer "yes" (spam) or "no" (ham): words a base instruct model already uses,
so its zero-shot score is a fair starting point.

The collection repeats some messages (5,574 lines, 5,171 distinct texts); a text is kept once, so
no test message is in the training split. test.jsonl is balanced, 100 spam and 100 ham drawn at
random: accuracy 0.5 is chance and answering always "no" scores 0.5 rather than the 0.87 it would
get on the collection's mix. train.jsonl is every other message, shuffled within each class, the
classes alternating (spam, ham, spam, ...) while the spam lasts (553 of each), then the rest of
the ham: its first 2N records are balanced, and an experiment takes as many as it has time for
(data `limit`). Trained on the collection's mix (13% spam), 600 records taught SmolLM2 to answer
"no": 16 of the 100 held-out spam found.
"""

import hashlib
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "SMSSpamCollection"
SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # the file as published
INSTRUCTION = "Is the following SMS message spam? Answer yes or no."
ANSWER = {"spam": "yes", "ham": "no"}
N_TEST_PER_CLASS = 100
SEED = 0


def read_collection(path: Path) -> list[tuple[str, str]]:
    """(label, message) per distinct message, in file order."""
    seen: set[str] = set()
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        label, sep, text = line.partition("\t")
        if not sep or label not in ANSWER:
            raise ValueError(f"{path}:{number}: expected `ham|spam<TAB>message`, got {line[:60]!r}")
        if text not in seen:
            seen.add(text)
            out.append((label, text))
    return out


def record(label: str, text: str) -> dict:
    return {"instruction": INSTRUCTION, "input": text, "output": ANSWER[label]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{SOURCE}: sha256 {digest}, not the published file's {SHA256}")
    messages = read_collection(SOURCE)
    rng = random.Random(SEED)
    test = []
    for label in ("spam", "ham"):
        test += rng.sample([m for m in messages if m[0] == label], N_TEST_PER_CLASS)
    rng.shuffle(test)
    held_out = set(test)
    spam, ham = ([m for m in messages if m[0] == label and m not in held_out] for label in ("spam", "ham"))
    rng.shuffle(spam)
    rng.shuffle(ham)
    train = [m for pair in zip(spam, ham) for m in pair] + ham[len(spam) :]
    write_jsonl(HERE / "train.jsonl", [record(*m) for m in train])
    write_jsonl(HERE / "test.jsonl", [record(*m) for m in test])
    print(f"{len(train)} training and {len(test)} test records from {len(messages)} distinct messages")


if __name__ == "__main__":
    main()
