"""How load_data draws the synthetic task's training and test problems (issue 17, item 3).

The test set must be drawn like the training set, be fixed by --data_seed (and --n_test) whatever
--n_train, and never hold a training problem. Everything is checked through `D.load_data` with a
`train.parse_args` config, where runs get their data; step counts and answers are recomputed here
from the prompt.
"""
import re
from collections import Counter

import pytest

import data as D
import train

ENC = D.char_encoding()


def load(*flags):
    """(training + validation prompts, test examples) of a synthetic run with these flags."""
    train_set, val_set, test = D.load_data(train.parse_args(["--block_size", "96", *flags]), ENC)
    return [ex.prompt for ex in train_set.examples + val_set.examples], test


def step_count(prompt: str) -> int:
    assert re.fullmatch(r"Q: \d+([+-]\d)+", prompt), prompt
    return len(re.findall(r"[+-]", prompt))


def value(prompt: str) -> int:
    terms = re.findall(r"([+-]?)(\d+)", prompt.removeprefix("Q: "))
    return sum(-int(x) if sign == "-" else int(x) for sign, x in terms)


def shares(prompts) -> dict[int, float]:
    counts = Counter(step_count(p) for p in prompts)
    return {k: counts[k] / len(prompts) for k in range(1, 6)}


@pytest.fixture(scope="module")
def default_size():
    """The default run's 20,000 training problems next to 1,000 test problems, data_seed 0."""
    return load("--n_train", "20000", "--n_test", "1000", "--data_seed", "0")


def test_test_set_is_fixed_by_data_seed_whatever_n_train():
    _, small = load("--n_train", "300", "--n_test", "100", "--n_val", "30", "--data_seed", "0")
    _, large = load("--n_train", "3000", "--n_test", "100", "--n_val", "30", "--data_seed", "0")
    _, other = load("--n_train", "300", "--n_test", "100", "--n_val", "30", "--data_seed", "1")
    _, fewer = load("--n_train", "3000", "--n_test", "40", "--n_val", "30", "--data_seed", "0")
    assert small == large
    assert fewer == small[:40]  # the first k test problems are the same for any --n_test >= k
    assert len({ex.prompt for ex in other} & {ex.prompt for ex in small}) < 50


def test_no_test_problem_is_a_training_or_validation_problem(default_size):
    pool, test = default_size
    assert not {ex.prompt for ex in test} & set(pool)


def test_step_counts_are_drawn_alike_in_train_and_test(default_size):
    pool, test = default_size
    in_train, in_test = shares(pool), shares([ex.prompt for ex in test])
    assert all(abs(in_train[k] - in_test[k]) < 0.05 for k in range(1, 6)), (in_train, in_test)
    # and both follow the task's law: 1 to 5 steps, uniformly
    assert all(abs(share - 0.2) < 0.03 for k in range(1, 6) for share in (in_train[k], in_test[k]))


def test_test_problems_are_distinct_and_answers_correct(default_size):
    pool, test = default_size
    assert len({ex.prompt for ex in test}) == len(test) == 1000
    for ex in test:
        assert ex.answer == str(value(ex.prompt)) and ex.thinking.endswith(f"={ex.answer}")
    assert all(value(p) >= 0 for p in pool)


def test_too_many_test_problems_for_the_task_is_an_error():
    # There are only 306 distinct one-step problems: 2,000 test problems would need about 400.
    with pytest.raises(D.DataError, match="--n_test"):
        load("--n_train", "300", "--n_test", "2000", "--n_val", "30")
