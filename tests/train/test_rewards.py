"""GRPO's built-in rewards on answers as datasets publish them."""

from __future__ import annotations

from ftflow.train.rewards import exact_match, regex_match

# GSM8K's published form: the reference is a worked solution whose last line is "#### <answer>"
GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_regex_match_reads_the_answer_out_of_a_worked_reference():
    completions = [GSM8K_ANSWER, "So the total is 48 + 24.\n#### 72", "#### 71", "72"]
    # the reference itself scores 1; a completion without the pattern scores 0
    assert regex_match(completions, [GSM8K_ANSWER] * 4, pattern=r"#### (\S+)") == [1.0, 1.0, 0.0, 0.0]


def test_regex_match_compares_with_a_plain_reference_as_it_is():
    assert regex_match(["#### 72", "#### 7", "#### 72"], ["72", "72", None], pattern=r"#### (\S+)") == [1.0, 0.0, None]
    assert exact_match([" Blue ", "red"], ["blue", "blue"]) == [1.0, 0.0]
