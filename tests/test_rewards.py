"""Answer extraction, reward functions and the deadline-bounded reward pool."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from poer_jax.rewards.answers import extract_last_boxed, grade_completion, parse_gold, wrap_boxed
from poer_jax.rewards.functions import (
    accuracy_reward,
    cosine_scaled_reward,
    format_reward,
    load_reward_function,
    make_cosine_reward,
    resolve_reward,
)
from poer_jax.train.reward_pool import RewardFunctionError, RewardPool, RewardSpec

HELPERS = str(Path(__file__).with_name("helpers_rewards.py"))
GOOD = "<think>\n3 + 4 = 7.\n</think>\n\\boxed{7}"


# ---------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}} then \\boxed{\\sqrt{3}}", "\\sqrt{3}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),
        ("\\boxed{\\boxed{7}1}", "\\boxed{7}1"),  # the box that ends last, not the innermost
        ("\\fbox{x^{2}}", "x^{2}"),
        ("\\boxed 5$", "5"),
        ("no box here", None),
        ("\\boxedfoo{1}", None),
    ],
)
def test_extract_last_boxed(text: str, expected: str | None) -> None:
    assert extract_last_boxed(text) == expected


def test_gold_parse_falls_back_to_answer_column() -> None:
    assert wrap_boxed("42") == "\\boxed{42}" and wrap_boxed("\\boxed{42}") == "\\boxed{42}"
    assert parse_gold("no latex answer in this text", 42)  # the answer column, boxed
    assert parse_gold(None, None) == []
    assert grade_completion("\\boxed{0.5}", None, "\\frac{1}{2}").correct is True
    assert grade_completion("\\boxed{42}", "no gold", None).correct is None


def test_accuracy_reward_correct_incorrect_unparseable() -> None:
    completions = [
        GOOD,  # correct
        "<think>\nx\n</think>\n\\boxed{8}",  # wrong
        "<think>\nthe answer is 7\n</think>\n",  # no box: unparseable prediction
        "\\boxed{\\frac{14}{2}}",  # equivalent form
        "\\boxed{2} first, finally \\boxed{7}",  # the last box counts
        "\\boxed{7}",  # the gold cannot be parsed: not gradable
    ]
    solutions = ["3 + 4 = 7. \\boxed{7}"] * 5 + ["no answer"]
    answers = [None, None, None, "7", None, None]
    assert accuracy_reward(completions, solution=solutions, answer=answers) == [1.0, 0.0, 0.0, 1.0, 1.0, None]
    # conversational completions (TRL) and the answer-only (AIME-style) gold
    assert accuracy_reward([[{"role": "assistant", "content": GOOD}]], answer=[7]) == [1.0]


def test_format_reward_needs_exactly_one_think_close() -> None:
    completions = [
        GOOD,
        "3 + 4 = 7.\n</think>\n\\boxed{7}",
        "no think",
        "a\n</think>\nb\n</think>\n",
        "a</think>\\boxed{7}",
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------- cosine


def test_cosine_hand_values_and_clamp() -> None:
    lengths = np.array([0, 25, 50, 75, 100, 150, 200, 1000])
    right = cosine_scaled_reward(np.ones(8, bool), lengths, max_len=100)
    wrong = cosine_scaled_reward(np.zeros(8, bool), lengths, max_len=100)
    c = 0.5 * (1 + math.cos(math.pi / 4))  # progress 1/4
    np.testing.assert_allclose(
        right, [1.0, 0.5 + 0.5 * c, 0.75, 0.5 + 0.5 * (1 - c), 0.5, 0.5, 0.5, 0.5], atol=1e-12
    )
    np.testing.assert_allclose(
        wrong, [0.0, -0.5 + 0.5 * c, -0.25, -0.5 + 0.5 * (1 - c), -0.5, -0.5, -0.5, -0.5], atol=1e-12
    )
    # Not periodic past max_len (open-rs's unclamped cos gives 1.0 again at 2 * max_len).
    dense = np.arange(0, 400)
    assert np.all(np.diff(cosine_scaled_reward(np.ones(400, bool), dense, 100)) <= 1e-15)
    assert np.all(np.diff(cosine_scaled_reward(np.zeros(400, bool), dense, 100)) <= 1e-15)
    with pytest.raises(ValueError, match="max_len must be positive"):
        cosine_scaled_reward(True, 3, 0)


def test_cosine_trl_signature_counts_tokens_not_characters() -> None:
    fn = make_cosine_reward(max_len=10)
    out = fn(
        [GOOD, "\\boxed{8}", "\\boxed{7}"],
        completion_ids=[[1] * 5, [1] * 10, [1] * 30],
        solution=["\\boxed{7}"] * 3,
    )
    np.testing.assert_allclose(out, [0.75, -0.5, 0.5], atol=1e-12)
    with pytest.raises(ValueError, match="needs max_len"):
        make_cosine_reward(max_len=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- loading


def test_load_reward_function_errors() -> None:
    assert load_reward_function(f"{HELPERS}:length_reward")([], ["abc"], None) == [3.0]
    assert load_reward_function("poer_jax.rewards.functions:format_reward") is format_reward
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_reward_function("just_a_name")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward_function(f"{HELPERS}:missing")
    with pytest.raises(ValueError, match="'NOT_CALLABLE' is not callable"):
        load_reward_function(f"{HELPERS}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        resolve_reward("acuracy")
    with pytest.raises(ValueError, match="cosine reward needs max_len"):
        RewardPool([RewardSpec("cosine")], num_workers=0)


# ---------------------------------------------------------------------------------------------- pool

SPECS = [
    RewardSpec("accuracy", weight=1.0),
    RewardSpec("format", weight=0.5),
    RewardSpec("cosine", weight=2.0, kwargs={"max_len": 10}),
    RewardSpec(f"{HELPERS}:length_reward", weight=0.0),
    RewardSpec(f"{HELPERS}:hang_on_marker", weight=1.0),
]
COMPLETIONS = [GOOD, "\\boxed{8}", "NONE \\boxed{7}", "no answer"]
IDS = [[1] * 5, [1] * 10, [1] * 2, [1] * 40]
COLUMNS = {"solution": ["\\boxed{7}"] * 4, "answer": ["7"] * 4, "bonus": [0.0, 1.0, 2.0, 3.0]}


@pytest.fixture(scope="module")
def pool():
    with RewardPool(SPECS, num_workers=2, timeout_s=1.0, timeout_reward=-3.0) as p:
        yield p


def test_pool_matches_in_process_and_weighted_sum(pool: RewardPool) -> None:
    prompts = ["p"] * 4
    res = pool.compute(prompts, COMPLETIONS, IDS, COLUMNS)
    ref = RewardPool(SPECS, num_workers=0).compute(prompts, COMPLETIONS, IDS, COLUMNS)
    np.testing.assert_array_equal(np.isnan(res.per_function), np.isnan(ref.per_function))
    np.testing.assert_allclose(np.nan_to_num(res.per_function), np.nan_to_num(ref.per_function))
    assert res.names == ["accuracy", "format", "cosine", "length_reward", "hang_on_marker"]
    np.testing.assert_allclose(res["accuracy"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(res["format"], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(
        res["length_reward"], [len(c) + b for c, b in zip(COMPLETIONS, COLUMNS["bonus"], strict=True)]
    )
    assert np.isnan(res["hang_on_marker"][2]) and res.nones["hang_on_marker"] == 1
    expected_total = [np.nansum(res.per_function[i] * [1.0, 0.5, 2.0, 0.0, 1.0]) for i in range(4)]
    np.testing.assert_allclose(res.total, expected_total)
    assert res.metrics()["rewards/format/mean"] == 0.25
    by_length = pool.compute(prompts, COMPLETIONS, None, COLUMNS, completion_lengths=[len(x) for x in IDS])
    np.testing.assert_allclose(by_length["cosine"], res["cosine"])
    np.testing.assert_allclose(
        res["cosine"],
        [0.5 + 0.25 * (1 + math.cos(math.pi / 2)), -0.5, 0.5 + 0.25 * (1 + math.cos(math.pi / 5)), -0.5],
    )
    zero = RewardPool(SPECS, num_workers=0, none_policy="zero").compute(prompts, COMPLETIONS, IDS, COLUMNS)
    assert zero["hang_on_marker"][2] == 0.0


def test_hanging_reward_is_cut_off_at_its_deadline(pool: RewardPool) -> None:
    completions = [GOOD, "HANG \\boxed{7}", GOOD, GOOD]
    before = set(pool.worker_pids())
    t0 = time.monotonic()
    res = pool.compute(["p"] * 4, completions, IDS, COLUMNS)
    elapsed = time.monotonic() - t0
    # cut off at the deadline (timeout_s = 1 s): not before it, and not much after (the hang is an hour)
    assert pool.timeout_s <= elapsed < pool.timeout_s + 4.0
    assert res["hang_on_marker"].tolist() == [1.0, -3.0, 1.0, 1.0]
    assert res.timeouts["hang_on_marker"] == 1 and sum(res.timeouts.values()) == 1
    # The hung item's other rewards still ran (on a fresh worker), and the hung worker is gone.
    assert res["accuracy"].tolist() == [1.0, 1.0, 1.0, 1.0]
    killed = before - set(pool.worker_pids())
    assert len(killed) == 1
    pid = killed.pop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # The next step is not stalled.
    t0 = time.monotonic()
    res = pool.compute(["p"] * 4, COMPLETIONS, IDS, COLUMNS)
    assert time.monotonic() - t0 < 1.0 and sum(res.timeouts.values()) == 0


def test_crashing_and_raising_reward_functions() -> None:
    specs = [RewardSpec("format"), RewardSpec(f"{HELPERS}:crash_on_marker")]
    completions = ["CRASH", "fine", "RAISE", "fine"]
    with RewardPool(specs, num_workers=2, timeout_s=5.0, on_error="default", error_reward=-1.0) as p:
        res = p.compute(["p"] * 4, completions)
        assert res["crash_on_marker"].tolist() == [-1.0, 2.0, -1.0, 2.0]
        assert res.errors["crash_on_marker"] == 2 and res.errors["format"] == 0
        assert p.compute(["p"], ["fine"])["crash_on_marker"].tolist() == [2.0]
    with RewardPool(specs, num_workers=1, timeout_s=5.0) as p:
        failed = r"(?s)crash_on_marker' failed on completion 0:.*ZeroDivisionError"
        with pytest.raises(RewardFunctionError, match=failed):
            p.compute(["p"], ["RAISE"])
        assert p.compute(["p"], ["fine"])["crash_on_marker"].tolist() == [2.0]
    with pytest.raises(RewardFunctionError, match="returned 'not a number'"):
        RewardPool([f"{HELPERS}:wrong_type"], num_workers=0).compute(["p"], ["x"])


def test_pool_checks_batch_shapes(pool: RewardPool) -> None:
    with pytest.raises(ValueError, match="column 'answer' has 1 entries for 2 completions"):
        pool.compute(["p", "p"], ["a", "b"], columns={"answer": ["1"]})


def test_hanging_math_verify_is_killed_once_for_all_grading_rewards() -> None:
    # 9^(9^9) has ~370 million digits: sympy evaluates it in C for minutes, a real grading hang.
    specs = [RewardSpec("accuracy"), RewardSpec("format"), RewardSpec("cosine", kwargs={"max_len": 10})]
    with RewardPool(specs, num_workers=2, timeout_s=1.0) as p:
        before = set(p.worker_pids())
        res = p.compute(["p", "p"], ["\\boxed{9^{9^{9}}}", GOOD], [[1], [1]], {"answer": ["7", "7"]})
        assert res.timeouts == {"accuracy": 1, "format": 0, "cosine": 1}
        assert res["accuracy"].tolist() == [0.0, 1.0] and res["format"].tolist() == [0.0, 1.0]
        # cosine was not retried on the item whose grading hung: exactly one worker was killed
        assert len(before - set(p.worker_pids())) == 1


def test_step_deadline_bounds_the_whole_batch() -> None:
    """Three calls that would each run into the 60 s per-call deadline, one at a time on one worker: the
    batch's 1 s deadline cuts all three (counted as timeouts and in deadline_cut) and the worker is replaced."""
    with RewardPool([f"{HELPERS}:hang_on_marker"], num_workers=1, timeout_s=60.0, timeout_reward=-3.0) as p:
        before = set(p.worker_pids())
        res = p.compute(["p"] * 3, ["HANG a", "HANG b", "fine"], deadline_s=1.0)
        assert res.deadline_cut == 3 and res.timeouts["hang_on_marker"] == 3
        assert res["hang_on_marker"].tolist() == [-3.0, -3.0, -3.0]
        assert res.metrics()["rewards/deadline_cut"] == 3.0
        assert not before & set(p.worker_pids())
        done = p.compute(["p"] * 2, ["fine", "NONE"], deadline_s=30.0)  # within its deadline: nothing cut
        assert done.deadline_cut == 0 and done["hang_on_marker"][0] == 1.0 and done.nones["hang_on_marker"] == 1


def test_failures_keep_each_functions_first_traceback() -> None:
    specs = [RewardSpec(f"{HELPERS}:crash_on_marker"), RewardSpec(f"{HELPERS}:wrong_type")]
    with RewardPool(specs, num_workers=1, timeout_s=5.0, on_error="zero") as p:
        res = p.compute(["p"] * 3, ["fine", "RAISE", "RAISE"])
    assert res.errors == {"crash_on_marker": 2, "wrong_type": 3}
    assert res["crash_on_marker"].tolist() == [2.0, 0.0, 0.0]
    assert "failed on completion 1" in res.first_errors["crash_on_marker"]
    assert "ZeroDivisionError: deliberate failure" in res.first_errors["crash_on_marker"]  # the traceback
    assert "returned 'not a number'" in res.first_errors["wrong_type"]


@pytest.mark.parametrize("workers", [0, 1])
def test_nan_and_inf_rewards_are_counted_alike_and_given_zero(workers: int) -> None:
    """NaN, inf and -inf from a function: 0 for that completion, counted per function and in
    rewards/non_finite, left out of the function's mean (over the finite values, with their count); every
    metric finite. With on_error="raise" each of them stops the batch."""
    specs = [RewardSpec("format"), RewardSpec(f"{HELPERS}:non_finite_on_marker", weight=2.0)]
    completions = ["NAN", "abcd", "INF", "NEGINF", "ab"]
    with RewardPool(specs, num_workers=workers, timeout_s=5.0, on_error="zero") as p:
        res = p.compute(["p"] * 5, completions)
    assert res["non_finite_on_marker"].tolist() == [0.0, 4.0, 0.0, 0.0, 2.0]
    assert res.total.tolist() == [0.0, 8.0, 0.0, 0.0, 4.0]
    assert res.non_finite == {"format": 0, "non_finite_on_marker": 3} and res.errors["non_finite_on_marker"] == 0
    assert "returned nan on completion 0" in res.first_errors["non_finite_on_marker"]
    m = res.metrics()
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["rewards/non_finite"] == 3.0 and m["rewards/non_finite_on_marker/non_finite"] == 3.0
    assert m["rewards/non_finite_on_marker/count"] == 2.0 and m["rewards/non_finite_on_marker/mean"] == 3.0
    assert m["rewards/non_finite_on_marker/std"] == 1.0 and m["rewards/format/count"] == 5.0
    assert m["reward"] == pytest.approx(12.0 / 5)
    for marker, shown in (("NAN", "nan"), ("INF", "inf"), ("NEGINF", "-inf")):
        with pytest.raises(RewardFunctionError, match=f"returned {shown} on completion 1"):
            RewardPool(specs, num_workers=0, on_error="raise").compute(["p"] * 2, ["ok", marker])


def test_a_function_with_no_finite_value_has_no_mean_but_a_count() -> None:
    res = RewardPool([f"{HELPERS}:hang_on_marker"], num_workers=0).compute(["p"] * 2, ["NONE", "NONE"])
    m = res.metrics()
    assert m["rewards/hang_on_marker/count"] == 0.0 and "rewards/hang_on_marker/mean" not in m
    assert all(math.isfinite(v) for v in m.values()), m
