"""`ftflow chat`: a real chat model (SmolLM2-135M-Instruct) answers through its own chat
template and generation config, keeps the conversation, and stops at its end of turn; the
pipeline's consolidated model is checked the same way in tests/test_smollm2_dag.py."""

from __future__ import annotations

import re
import subprocess

import pytest

from helpers import BIN, env, ftflow

ENDED = r"\[\d+ tokens, ended at <\|im_end\|>\]"


@pytest.mark.slow
def test_a_conversation_keeps_its_turns_and_each_answer_ends_at_the_end_of_turn(smollm2_dir, tmp_path):
    proc = subprocess.run([str(BIN / "ftflow"), "chat", str(smollm2_dir), "--max-new-tokens", "48"], cwd=tmp_path,
                          input="What is the capital of France?\nAnd of Italy?\n\n", env=env(), text=True,
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = re.findall(r"model> (.*)", proc.stdout)
    assert len(answers) == 2 and "Paris" in answers[0], proc.stdout
    assert "Rome" in answers[1], proc.stdout  # "And of Italy?" means something only after the first turn
    assert len(re.findall(ENDED, proc.stderr)) == 2, proc.stderr[-3000:]


def test_chat_without_a_model_says_where_one_comes_from(tmp_path):
    proc = ftflow("chat", "--prompt", "hi", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("ftflow chat: results/consolidate/model holds no model (no config.json): run the "
                                   "workflow (its consolidate stage writes results/consolidate/model) or name a model "
                                   "folder")  # fmt: skip
