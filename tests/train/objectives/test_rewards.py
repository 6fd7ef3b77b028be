"""GRPO's builtin rewards and the user-reward contract."""

import pytest

from doge_cli.errors import DogeError
from doge_cli.train.objectives.rewards import (
    accuracy_reward,
    answers_match,
    call_reward,
    format_reward,
    length_reward,
    repetition_reward,
    resolve_reward,
)


def test_rewards():
    sol = "<|begin_of_thought|> think <|end_of_thought|> <|begin_of_solution|> 1/2 <|end_of_solution|>"
    assert accuracy_reward([sol, "the answer is \\boxed{0.5}", "0.25", "\\frac{1}{2}."], ["0.5"] * 4) == [1, 1, 0, 1]
    assert answers_match("1,000", "1000") and answers_match("-3", "-3.0") and not answers_match("x", "y")
    assert format_reward([sol, "<|begin_of_thought|> a", "nothing", "<|end_of_thought|>"]) == [1.0, 0.125, 0.0, 0.0]
    assert length_reward(["a"] * 3, completion_lengths=[10, 14, 16], max_completion_length=16) == [0.0, -0.5, -1.0]
    assert repetition_reward(["a b c a b c a b c", "one two three four"]) == [pytest.approx(-4 / 7), 0.0]


def test_accuracy_reads_the_answer_part_only():
    # A correct number inside the thinking is no answer; the solution's is.
    wrong = "<|begin_of_thought|> \\boxed{4} <|end_of_thought|> <|begin_of_solution|> 5 <|end_of_solution|>"
    right = "<|begin_of_thought|> maybe 5 <|end_of_thought|> <|begin_of_solution|> \\boxed{4} <|end_of_solution|>"
    assert accuracy_reward([wrong, right], ["4", "4"]) == [0.0, 1.0]


def test_a_reward_must_give_one_number_per_completion():
    with pytest.raises(DogeError, match="returned 1 values for 2 completions"):
        call_reward("short", lambda c, a, p, **i: [1.0], ["a", "b"], ["1", "2"], [[], []])
    with pytest.raises(DogeError, match="must return a list of numbers"):
        call_reward("bad", lambda c, a, p, **i: ["x", "y"], ["a", "b"], ["1", "2"], [[], []])
    assert call_reward("none-is-0", lambda c, a, p, **i: [None, 2], ["a", "b"], ["1", "2"], [[], []]) == [0.0, 2.0]
    with pytest.raises(DogeError, match="unknown reward function"):
        resolve_reward("vibes")
