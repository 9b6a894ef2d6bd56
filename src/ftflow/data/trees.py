"""Message trees -> conversations: OpenAssistant's oasst1/oasst2 publish one message per row
(`message_id`, `parent_id`, `role` prompter/assistant, `text`, `rank` among siblings, `deleted`,
...), a tree per prompt. A tree's rows may be spread over the file (and over files), so the
source is read whole first; then each tree gives its threads, prompt to leaf:

    oasst          the top-ranked thread: from the prompt, always the reply of lowest `rank`
                   (0 is the best; unranked replies after ranked ones, in file order)
    oasst_threads  every thread that ends in a leaf

A thread is then a record like any other (its locator names the tree and the leaf), read by
readers.oasst. Deleted rows are left out with everything below them, and counted; so are rows
whose parent is nowhere in the source.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

from ftflow.data.formats import Item, parse_json_line
from ftflow.data.messages import RecordError

TREE_READERS = ("oasst", "oasst_threads")  # readers.oasst reads each thread


def threads(items: Iterable[Item], every: bool, counts: Counter) -> Iterator[Item]:
    """The threads of every tree in the items (rows), in the order their prompts come; a row that
    is not a message (bad JSON, no message_id) is passed on as the error it is. `counts` gets the
    rows left out, per reason."""
    rows: dict[str, tuple[str, dict]] = {}
    for locator, payload in items:
        row = parse_json_line(payload) if isinstance(payload, bytes) else payload
        if isinstance(row, RecordError):
            yield locator, row
        elif not isinstance(row, dict) or not isinstance(row.get("message_id"), str):
            yield locator, RecordError("missing_field", "a message-tree row needs a string 'message_id'")
        else:
            rows[row["message_id"]] = (locator, row)
    counts["tree_rows"] += len(rows)
    below: dict[str | None, list[str]] = defaultdict(list)  # every row's replies, deleted ones too
    for message_id, (_, row) in rows.items():
        below[row.get("parent_id")].append(message_id)
    children: dict[str | None, list[str]] = defaultdict(list)  # the replies that threads may take
    for message_id, (_, row) in rows.items():
        parent = row.get("parent_id")
        if row.get("deleted") or (parent is not None and parent not in rows):
            reason = "tree_rows_deleted" if row.get("deleted") else "tree_rows_without_parent"
            counts[reason] += 1 + descendants(message_id, below)
        elif not (parent is not None and rows[parent][1].get("deleted")):
            children[parent].append(message_id)
    for key in children:
        children[key].sort(key=lambda m: (rows[m][1].get("rank") is None, rows[m][1].get("rank") or 0))
    for root in children[None]:
        for path in leaf_paths(root, children) if every else [best_path(root, children)]:
            locator = f"{rows[root][0]} (tree {root}, thread to {path[-1]})"
            yield locator, {"messages": [rows[m][1] for m in path]}


def descendants(message_id: str, below: dict) -> int:
    """How many rows hang below a message (left out with it)."""
    return sum(1 + descendants(m, below) for m in below.get(message_id, ()))


def best_path(root: str, children: dict) -> list[str]:
    path = [root]
    while children.get(path[-1]):
        path.append(children[path[-1]][0])
    return path


def leaf_paths(root: str, children: dict) -> list[list[str]]:
    if not children.get(root):
        return [[root]]
    return [[root, *rest] for child in children[root] for rest in leaf_paths(child, children)]
