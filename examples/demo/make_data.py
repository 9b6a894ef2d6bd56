"""Generate the demo task: answer "What is the first/last word?" about a list of words.

The task is deterministic, needs no world knowledge and has a large space of inputs, so a
tiny model trained from scratch must learn the rule (read the question, find the position,
copy the word) to score on the held-out split: no test record appears in the training split.
It is also small enough to be learnt in about a minute on 2 CPU cores. (Reversing the words
was tried first: the copy-in-reverse circuit did not form within a few minutes' training.)

    python examples/demo/make_data.py   # rewrites the files below (same bytes)

train.jsonl and test.jsonl hold the task; validation.jsonl, disjoint from both, is what training
evaluates as it goes (the validation loss in results/train/loss.csv).

The same training records, in the forms the other trainers take (`train=dpo|kto|grpo`):
  preference.jsonl  DPO: prompt, chosen (the right word), rejected (the word at the other end)
  unpaired.jsonl    KTO: prompt, completion, label (every other record gets the wrong word)
  prompts.jsonl     GRPO: prompt and its reference answer (the exact-match reward's target)
"""

import json
import random
from pathlib import Path

WORDS = (
    "red blue green black white pink gold gray "
    "cat dog fox owl bee cow pig hen "
    "apple pear plum lime fig kiwi melon grape "
    "sun moon star rain snow wind sky sea"
).split()
QUESTIONS = {
    "What is the first word?": lambda words: words[0],
    "What is the last word?": lambda words: words[-1],
}
MIN_WORDS, MAX_WORDS = 3, 6
N_TRAIN, N_VALIDATION, N_TEST = 3000, 200, 200  # validation: the curve during training
SEED = 1234


def sample_records(rng: random.Random, n: int, exclude: set[tuple[str, str]]) -> list[dict]:
    """`n` distinct (question, words) records, none of them in `exclude`."""
    seen: set[tuple[str, str]] = set()
    out = []
    while len(out) < n:
        question = rng.choice(sorted(QUESTIONS))
        words = rng.sample(WORDS, rng.randint(MIN_WORDS, MAX_WORDS))
        key = (question, " ".join(words))
        if key not in seen and key not in exclude:
            seen.add(key)
            # alpaca format: the demo goes through the same reader as users' alpaca data
            out.append({"instruction": question, "input": key[1], "output": QUESTIONS[question](words)})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def other_end(record: dict) -> str:
    """The wrong answer a careless reader gives: the word at the other end of the list."""
    words = record["input"].split()
    return words[0] if record["output"] == words[-1] else words[-1]


def derived(train: list[dict]) -> dict[str, list[dict]]:
    prompts = [f"{r['instruction']}\n{r['input']}" for r in train]
    return {
        "preference.jsonl": [
            {"prompt": p, "chosen": r["output"], "rejected": other_end(r)} for p, r in zip(prompts, train)
        ],
        "unpaired.jsonl": [
            {"prompt": p, "completion": r["output"] if i % 2 == 0 else other_end(r), "label": i % 2 == 0}
            for i, (p, r) in enumerate(zip(prompts, train))
        ],  # fmt: skip
        "prompts.jsonl": [{"prompt": p, "answer": r["output"]} for p, r in zip(prompts, train)],
    }


def main() -> None:
    rng = random.Random(SEED)
    here = Path(__file__).parent
    test = sample_records(rng, N_TEST, exclude=set())
    train = sample_records(rng, N_TRAIN, exclude={(r["instruction"], r["input"]) for r in test})
    # drawn last, so that train and test stay the bytes they were before it existed
    validation = sample_records(rng, N_VALIDATION, exclude={(r["instruction"], r["input"]) for r in test + train})
    write_jsonl(here / "train.jsonl", train)
    write_jsonl(here / "validation.jsonl", validation)
    write_jsonl(here / "test.jsonl", test)
    for name, records in derived(train).items():
        write_jsonl(here / name, records)
    print(f"wrote {len(train)} train, {len(validation)} validation and {len(test)} test records to {here}")


if __name__ == "__main__":
    main()
