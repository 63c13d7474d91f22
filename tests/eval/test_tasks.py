"""Every task generator is deterministic for a seed, fills exactly the asked length, hides its answer
in the prompt where the task says, and its scorer gives 1.0 on the gold answer and 0.0 on a wrong one."""

import pytest

from horizon.errors import ConfigError
from horizon.eval.tasks import TASKS, get_task, score


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generator_is_deterministic_and_scorer_separates_gold_from_wrong(name):
    task = TASKS[name]
    for length in (400, 700):
        for x in task.default_xs:
            a, b = task.generate(7, length, x), task.generate(7, length, x)
            assert a == b
            assert len(a.text) == length and a.text.isascii()
            assert score(a, a.answer) == 1.0 and score(a, a.answer + "\nmore text") == 1.0
            wrong = a.answer[:-1] + ("0" if a.answer[-1] != "0" else "1")
            assert score(a, wrong) == 0.0 and score(a, a.answer + " extra") == 0.0 and score(a, "") == 0.0
    others = {task.generate(s, 700, task.default_xs[0]).answer for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_passkey_sits_at_the_asked_depth():
    for depth in (0.0, 0.5, 1.0):
        s = get_task("passkey").generate(3, 2000, depth)
        at = s.prompt.index(f"The pass key is:{s.answer}.") / len(s.prompt)
        assert abs(at - depth) < 0.06, (depth, at)


def test_answers_follow_from_the_prompt_by_rule():
    """Independent readings of the prompts recover the gold answers."""
    s = get_task("arithmetic_chain").generate(1, 900, 5)
    env = {}
    for stmt in s.prompt.split("Let ")[1:]:
        name, expr = stmt.split(".")[0].split(" = ")
        env[name] = eval(expr, {}, dict(env))  # our own generated arithmetic
    assert str(env[s.prompt.rsplit("What is ", 1)[1].split("?")[0]]) == s.answer

    s = get_task("needle_threading").generate(2, 900, 0.3)
    links = dict(line.split(" -> ") for line in s.prompt.split("\n") if " -> " in line)
    key = s.prompt.split("Follow the thread from ")[1].split(".")[0]
    for _ in range(3):
        key = links[key.strip()]
    assert key == s.answer

    s = get_task("segment_ordering").generate(3, 600, 4)
    shown = {int(line[1]): line[4:] for line in s.prompt.split("\n") if line.startswith("[")}
    order = sorted(shown, key=lambda j: int(shown[j].split()[1]))  # by the second (whole) number
    assert " ".join(map(str, order)) == s.answer

    s = get_task("mqar").generate(4, 500, 0.5)
    pairs = dict(p.split(":") for p in s.prompt.split("\n")[0].split())
    queries = s.prompt.split("query ")[1].split("\n")[0].split()
    assert " ".join(pairs[q] for q in queries) == s.answer


def test_too_short_a_length_and_unknown_task_are_config_errors():
    with pytest.raises(ConfigError, match="--lengths"):
        get_task("niah_multikey").generate(0, 64, 0.5)
    with pytest.raises(ConfigError, match="--task"):
        get_task("nope")
