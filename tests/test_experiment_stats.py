"""The experiment's statistics and wiring on hand-made, non-degenerate inputs.

tests/test_experiment.py runs a miniature experiment whose arms score 0 on every problem, so its
comparisons compare zeros with zeros: pairing the wrong seeds, averaging one seed only or swapping
the arms would all pass there. Here every arm and seed has different, known per-item scores, and
every expected value is computed in the test with numpy, so such mistakes change the answer. The
arm runner (`run_seed`) is checked with a stand-in for `train.train` that records its arguments and
marks the weights, plus one short run of the real loop that records which batches each arm reads.
"""
import dataclasses
import json
import math
import types

import numpy as np
import pytest
import torch

import checkpoints
import data as D
import experiment as E
import sftkey
import train
from conftest import stage_fields


# ---------------------------------------------------------------------------------------------
# paired_comparison

def _three_seed_design():
    """Per-item differences for 3 seeds x 4 items whose item means (over seeds) are [1, 0, 0, 0].

    The per-seed means (+0.5, +0.5, -0.25) all differ from the overall mean (+0.25), so a mean
    taken from one seed is wrong; pairing item i across seeds makes the bootstrap distribution
    exactly that of Binomial(4, 1/4) / 4.
    """
    diff = np.array([[1, 1, -1, 1],
                     [1, 0, 1, 0],
                     [1, -1, 0, -1]], dtype=float)
    b = np.array([[0, 0, 1, 0],
                  [0, 1, 0, 0],
                  [0, 1, 1, 1]], dtype=float)
    return b + diff, b  # a, b: 0/1 scores with a - b = diff


def test_paired_comparison_mean_and_per_seed_follow_a_minus_b_over_all_seeds():
    a, b = _three_seed_design()
    c = E.paired_comparison(a, b, n_boot=200)
    assert c["mean"] == pytest.approx(np.sum(a - b) / a.size) == pytest.approx(0.25)
    assert c["per_seed"] == pytest.approx([0.5, 0.5, -0.25])  # seed order
    assert (c["n_seeds"], c["n_items"], c["n_boot"]) == (3, 4, 200)
    swapped = E.paired_comparison(b, a, n_boot=200)  # sign matters
    assert swapped["mean"] == pytest.approx(-0.25)
    assert swapped["per_seed"] == pytest.approx([-0.5, -0.5, 0.25])


def test_bootstrap_resamples_the_same_items_for_every_seed():
    # Item means are [1, 0, 0, 0]: a resample's mean is Binomial(4, 1/4) / 4, whose cumulative
    # probabilities are 0.316, 0.738, 0.949, 0.996, 1 at 0, 1/4, 1/2, 3/4, 1. The 2.5% quantile is
    # therefore 0 and the 97.5% quantile 3/4, exactly; shuffling seeds' items independently (losing
    # the pairing) spreads the distribution and moves them.
    a, b = _three_seed_design()
    p = 0.25
    cdf = np.cumsum([math.comb(4, k) * p ** k * (1 - p) ** (4 - k) for k in range(5)])
    assert cdf[0] > 0.025 and cdf[2] < 0.975 < cdf[3]  # so the exact quantiles are 0 and 3/4
    c = E.paired_comparison(a, b, n_boot=4000, seed=3)
    assert c["ci_items"] == [0.0, 0.75]


def test_bootstrap_of_seeds_that_cancel_per_item_is_exact_at_a_nonzero_mean():
    # Seed 0 gains 1 + x_i, seed 1 gains 1 - x_i: every item's mean over seeds is 1, so every
    # resample of shared item indices averages exactly 1, whatever the x_i.
    x = np.array([0.5, -0.25, 0.75, 0.0, -0.5, 0.25] * 5)
    b = np.zeros((2, x.size))
    a = np.stack([1 + x, 1 - x])
    c = E.paired_comparison(a, b, n_boot=500)
    assert c["mean"] == 1.0 and c["ci_items"] == [1.0, 1.0]
    assert c["per_seed"] == pytest.approx([1 + x.mean(), 1 - x.mean()])


def test_bootstrap_is_degenerate_when_every_item_has_the_same_difference():
    # Seeds differ (+1, 0, -0.25 on every item) but every item's mean over seeds is 0.25.
    rng = np.random.default_rng(5)
    b = rng.integers(0, 2, size=(3, 40)).astype(float)
    a = b + np.array([[1.0], [0.0], [-0.25]])
    c = E.paired_comparison(a, b, n_boot=300)
    assert c["mean"] == 0.25 and c["ci_items"] == [0.25, 0.25]
    assert c["per_seed"] == [1.0, 0.0, -0.25]


def test_confidence_interval_contains_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    pattern = rng.normal(0.1, 1.0, size=(2, 20))
    small = E.paired_comparison(pattern, np.zeros_like(pattern), n_boot=2000, seed=1)
    large_a = np.tile(pattern, 16)  # the same item distribution, 16x as many items
    large = E.paired_comparison(large_a, np.zeros_like(large_a), n_boot=2000, seed=1)
    for c in (small, large):
        assert c["ci_items"][0] < c["mean"] < c["ci_items"][1]
    width = {k: c["ci_items"][1] - c["ci_items"][0] for k, c in (("small", small), ("large", large))}
    assert large["mean"] == pytest.approx(small["mean"])
    # the standard error falls as 1/sqrt(n): 16x the items, a quarter of the width (within noise)
    assert 0.15 < width["large"] / width["small"] < 0.35


def test_level_sets_the_quantiles_of_the_bootstrap():
    # Two items with item means 1 and 0: a resample's mean is 0, 1/2 or 1 with probability 1/4,
    # 1/2, 1/4. At 95% the interval is [0, 1]; at 40% (quantiles 0.3 and 0.7) it is [1/2, 1/2].
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.zeros_like(a)
    assert E.paired_comparison(a, b, n_boot=4000, seed=2)["ci_items"] == [0.0, 1.0]
    narrow = E.paired_comparison(a, b, n_boot=4000, seed=2, level=0.4)
    assert narrow["ci_items"] == [0.5, 0.5] and narrow["level"] == 0.4


# A level-L interval cuts (1 - L) / 2 from each tail.
# (Mutation audit: `tail = 1 - level`, a 95% interval that is really a 90% one. The designs above have
# the same quantiles at 2.5%/5% and 95%/97.5%; this one does not.)


def test_a_95_percent_interval_puts_2_5_percent_in_each_tail():
    # Item means [1, 0, 0]: a resample's mean is Binomial(3, 1/3) / 3, whose cumulative
    # probabilities are 8/27, 20/27, 26/27 = 0.963, 1 at 0, 1/3, 2/3, 1. The 97.5% quantile is
    # therefore 1 and the 95% quantile 2/3; both low quantiles are 0.
    cdf = np.cumsum([math.comb(3, k) * (1 / 3) ** k * (2 / 3) ** (3 - k) for k in range(4)])
    assert 0.95 < cdf[2] < 0.975
    a = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    c = E.paired_comparison(a, np.zeros_like(a), n_boot=20_000, seed=4)
    assert c["ci_items"] == [0.0, 1.0]
    assert c["mean"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("a, b, kwargs", [
    (np.zeros((2, 5)), np.zeros((3, 5)), {}),  # different seeds
    (np.zeros(5), np.zeros(5), {}),  # not (seeds, items)
    (np.zeros((2, 0)), np.zeros((2, 0)), {}),  # no items
    (np.zeros((2, 5)), np.zeros((2, 5)), {"level": 1.0}),
    (np.zeros((2, 5)), np.zeros((2, 5)), {"level": 0.0}),
    (np.zeros((2, 5)), np.zeros((2, 5)), {"n_boot": 0}),
])
def test_paired_comparison_refuses_bad_shapes_and_settings(a, b, kwargs):
    with pytest.raises(ValueError):
        E.paired_comparison(a, b, **kwargs)


def test_paired_comparison_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 60)), rng.random((3, 60))
    first = E.paired_comparison(a, b, n_boot=1500, seed=7)
    assert E.paired_comparison(a, b, n_boot=1500, seed=7) == first
    assert E.paired_comparison(a, b, n_boot=1500, seed=8)["ci_items"] != first["ci_items"]


# ---------------------------------------------------------------------------------------------
# item_scores, aggregate, compare

def _result(seed, correct, formatted, seconds=1.0, all_stages=None):
    """A per-seed result dict shaped like run_seed's (from train.evaluate plus the timing): `seconds`
    of its last stage, `all_stages` of all of them (shared ones included)."""
    correct = [bool(c) for c in correct]
    acc = float(np.mean(correct))
    fmt = None if formatted is None else float(np.mean(formatted))
    return {"seed": seed, "acc": acc, "fmt": fmt, "composite": None if fmt is None else 0.7 * acc + 0.3 * fmt,
            "n": len(correct), "correct": correct, "formatted": None if formatted is None else [bool(f) for f in formatted],
            "responses": [], "steps": 3, "last_stage_seconds": seconds,
            "train_seconds": seconds if all_stages is None else all_stages}


def test_item_scores_are_correct_or_the_per_item_composite():
    r = _result(0, [1, 0, 1, 0], [1, 1, 0, 0])
    assert E.item_scores(r, "acc").tolist() == [1.0, 0.0, 1.0, 0.0]
    assert E.item_scores(r, "composite") == pytest.approx([1.0, 0.3, 0.7, 0.0])
    untagged = _result(0, [1, 0], None)
    assert E.item_scores(untagged, "acc").tolist() == [1.0, 0.0]
    assert E.item_scores(untagged, "composite") is None


def _mean_std(values):
    values = np.asarray(values, dtype=float)
    m = values.sum() / values.size
    return m, float(np.sqrt(((values - m) ** 2).sum() / (values.size - 1)))  # sample std


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    runs = [_result(0, [1, 0, 0, 0], [1, 1, 0, 0], seconds=10, all_stages=30),
            _result(1, [1, 1, 0, 0], [1, 1, 1, 1], seconds=14, all_stages=35),
            _result(2, [1, 1, 1, 0], [1, 0, 0, 0], seconds=12, all_stages=40)]
    agg = E.aggregate(runs)
    for key in ("acc", "fmt", "composite", "train_seconds", "last_stage_seconds"):
        mean, std = _mean_std([r[key] for r in runs])
        assert agg[key]["mean"] == pytest.approx(mean), key
        assert agg[key]["std"] == pytest.approx(std), key
    assert agg["acc"]["mean"] == pytest.approx(0.5) and agg["acc"]["std"] == pytest.approx(0.25)


def test_aggregate_of_one_seed_has_no_std_and_skips_undefined_metrics():
    one = E.aggregate([_result(0, [1, 0, 0, 0], [1, 1, 0, 0], seconds=8)])
    assert one["acc"] == {"mean": 0.25, "std": None}
    assert one["train_seconds"] == {"mean": 8.0, "std": None}
    untagged = E.aggregate([_result(0, [1, 0], None), _result(1, [1, 1], None)])
    assert untagged["fmt"] == untagged["composite"] == {"mean": None, "std": None}
    assert untagged["acc"]["mean"] == pytest.approx(0.75)
    mixed = [_result(0, [1, 0], [1, 1]), _result(1, [0, 0], None), _result(2, [1, 1], [0, 0])]
    assert E.aggregate(mixed)["fmt"] == {"mean": 0.5, "std": pytest.approx(np.sqrt(0.5))}  # the None is left out


SEEDS = (21, 22, 23)


def _results(arms, n_items=30, rng_seed=0):
    """results[arm] = per-seed result dicts with random, arm- and seed-specific scores."""
    rng = np.random.default_rng(rng_seed)
    results = {}
    for j, arm in enumerate(arms):
        correct = rng.random((len(SEEDS), n_items)) < 0.2 + 0.15 * j
        formatted = rng.random((len(SEEDS), n_items)) < 0.9 - 0.2 * j
        results[arm] = [_result(s, c, f) for s, c, f in zip(SEEDS, correct, formatted)]
    return results


def _matrix(runs, key):
    return np.array([r[key] for r in runs], dtype=float)


def test_compare_pairs_seed_k_of_one_arm_with_seed_k_of_the_other():
    results = _results(["sftkey_tag", "sft_tag", "sftsft_tag"])
    got = E.compare(results, n_boot=300, seed=4)
    assert set(got) == {"sftkey_tag - sft_tag", "sftkey_tag - sftsft_tag"}  # no "weighted": not run
    for b in ("sft_tag", "sftsft_tag"):
        ca, cb = _matrix(results["sftkey_tag"], "correct"), _matrix(results[b], "correct")
        fa, fb = _matrix(results["sftkey_tag"], "formatted"), _matrix(results[b], "formatted")
        expected = {"acc": (ca, cb), "composite": (0.7 * ca + 0.3 * fa, 0.7 * cb + 0.3 * fb)}
        for metric, (sa, sb) in expected.items():
            c = got[f"sftkey_tag - {b}"][metric]
            per_seed = (sa - sb).mean(axis=1)
            # the design is sensitive: another pairing, one seed only or the other metric would differ
            assert not np.allclose(per_seed, (sa - np.roll(sb, 1, axis=0)).mean(axis=1))
            assert not np.isclose(per_seed.mean(), per_seed[0])
            assert c["mean"] == pytest.approx((sa - sb).sum() / sa.size)
            assert c["per_seed"] == pytest.approx(per_seed)
            assert c["n_seeds"] == 3 and c["n_items"] == 30 and c["n_boot"] == 300
            assert c == E.paired_comparison(sa, sb, n_boot=300, seed=4)  # the same bootstrap too
        acc, comp = got[f"sftkey_tag - {b}"]["acc"], got[f"sftkey_tag - {b}"]["composite"]
        assert not np.isclose(acc["mean"], comp["mean"])


def test_compare_leaves_out_comparisons_with_missing_or_unequal_arms():
    results = _results(["sftkey_tag", "sft_tag", "weighted"])
    results["weighted"] = results["weighted"][:2]  # a seed short: not comparable
    assert set(E.compare(results, n_boot=50, seed=0)) == {"sftkey_tag - sft_tag"}
    assert E.compare(_results(["sft_tag", "sftsft_tag", "weighted"]), n_boot=50, seed=0) == {}


def test_compare_with_an_untagged_arm_gives_acc_only(monkeypatch):
    monkeypatch.setattr(E, "COMPARISONS", (("sftkey_tag", "sft"),))
    results = _results(["sftkey_tag"])
    untagged_correct = np.random.default_rng(9).random((len(SEEDS), 30)) < 0.4
    results["sft"] = [_result(s, c, None) for s, c in zip(SEEDS, untagged_correct)]
    got = E.compare(results, n_boot=100, seed=0)["sftkey_tag - sft"]
    assert set(got) == {"acc"}
    diff = _matrix(results["sftkey_tag"], "correct") - _matrix(results["sft"], "correct")
    assert got["acc"]["mean"] == pytest.approx(diff.mean())


# ---------------------------------------------------------------------------------------------
# Reasoning: is a synthetic problem's worked solution what the response wrote?

@pytest.mark.parametrize("response, tagged, reasoning", [
    ("<Thinking>1+2=3 3+4=7</Thinking><Answer>7</Answer>", True, "1+2=3 3+4=7"),
    ("<Thinking> 1+2=3 </Thinking><Answer>3</Answer>", True, "1+2=3"),  # spaces around it: as the data strips them
    ("<Thinking>1+2=3</Thinking><Answer>3</Answer></Thinking>", True, "1+2=3"),  # the first </Thinking> closes it
    ("<Thinking>1+2=3 3+4=7 7+1=8 8+1", True, None),  # never closed (cut at the length limit)
    ("1+2=3</Thinking><Answer>3</Answer>", True, None),  # not opened
    ("x<Thinking>1+2=3</Thinking><Answer>3</Answer>", True, None),  # not at the start
    ("1+2=3 3+4=7\n#### 7", False, "1+2=3 3+4=7"),
    ("1+2=3\n#### 3\n#### 3", False, "1+2=3\n#### 3"),  # before the last answer line, as Acc reads the last
    ("1+2=3 #### 3", False, None),  # no line of its own
    ("<Thinking>1+2=3</Thinking><Answer>3</Answer>", False, None),
])
def test_written_reasoning_of_either_layout(response, tagged, reasoning):
    assert E.written_reasoning(response, tagged) == reasoning


def test_reasoning_scores_split_acc_by_whether_the_reasoning_is_right():
    """Four problems: right reasoning and answer; right reasoning, wrong answer (it failed to copy its result);
    wrong reasoning, right answer (by luck); neither. Then a seed whose every reasoning is right."""
    test = [D.Example("Q: 1+2", "1+2=3", "3"), D.Example("Q: 2+2", "2+2=4", "4"), D.Example("Q: 3+2", "3+2=5", "5"),
            D.Example("Q: 4+2", "4+2=6", "6")]
    written = ["1+2=3", "2+2=4", "3+2=6 6-1=5", "4+2=7"]
    answers = ["3", "5", "5", "7"]
    responses = [{"response": f"<Thinking>{w}</Thinking><Answer>{a}</Answer>"} for w, a in zip(written, answers)]
    result = {"responses": responses, "correct": [True, False, True, False]}
    assert E.reasoning_scores(result, test, tagged=True) == {
        "reasoning_right": [True, True, False, False], "reasoning": 0.5, "acc_reasoning_right": 0.5,
        "acc_reasoning_wrong": 0.5}
    untagged = {"responses": [{"response": f"{ex.thinking}\n#### {ex.answer}"} for ex in test], "correct": [True] * 4}
    assert E.reasoning_scores(untagged, test, tagged=False) == {
        "reasoning_right": [True] * 4, "reasoning": 1.0, "acc_reasoning_right": 1.0, "acc_reasoning_wrong": None}
    assert E.reasoning_scores(untagged, test, tagged=True)["reasoning"] == 0.0  # read by the other layout's rule
    with pytest.raises(ValueError):  # responses and problems out of step: never scored against the wrong problem
        E.reasoning_scores(result, test[:3], tagged=True)


def test_item_scores_of_reasoning_and_its_comparison():
    a = [{**_result(seed, [1, 1], [1, 1]), "reasoning_right": [True, False]} for seed in SEEDS]
    b = [{**_result(seed, [1, 1], [1, 1]), "reasoning_right": [True, True]} for seed in SEEDS]
    assert E.item_scores(a[0], "reasoning").tolist() == [1.0, 0.0]
    assert E.item_scores(_result(0, [1], [1]), "reasoning") is None  # real data: not scored
    c = E.compare({"sftkey_tag": a, "sft_tag": b}, n_boot=10, seed=0)["sftkey_tag - sft_tag"]["reasoning"]
    assert c["mean"] == pytest.approx(-0.5) and c["per_seed"] == pytest.approx([-0.5] * 3)
    assert "reasoning" not in E.compare({"sftkey_tag": [_result(1, [1], [1])], "sft_tag": [_result(1, [0], [1])]},
                                        n_boot=10, seed=0)["sftkey_tag - sft_tag"]


# ---------------------------------------------------------------------------------------------
# markdown and Recorder

def _summary_by_hand(complete):
    cfg = dataclasses.asdict(train.TrainConfig(max_iters=7, stage2_iters=3, lr=2e-3, key_weight=2.5, batch_size=16))
    runs = {"sft": [{"n": 12}], "sft_tag": [{"n": 12}], "sftkey_tag": [{"n": 12}]}
    seconds = {"mean": 40.4, "std": None}
    return {
        "complete": complete, "config": cfg, "seeds": [4, 5], "n_boot": 123, "results": runs,
        "arms": {"sft": {"about": "about-sft"}, "sft_tag": {"about": "about-st"}, "sftkey_tag": {"about": "about-key"}},
        "aggregates": {
            "sft": {"acc": {"mean": 0.3, "std": None}, "fmt": {"mean": None, "std": None},
                    "composite": {"mean": None, "std": None}, "last_stage_seconds": seconds,
                    "train_seconds": seconds},
            "sft_tag": {"acc": {"mean": 0.4121, "std": 0.0312}, "fmt": {"mean": 0.8804, "std": 0.0123},
                        "composite": {"mean": 0.5526, "std": 0.0209}, "last_stage_seconds": {"mean": 51.2, "std": 1.0},
                        "train_seconds": {"mean": 51.2, "std": 1.0}},
            "sftkey_tag": {"acc": {"mean": 0.6182, "std": 0.0451}, "fmt": {"mean": 0.7027, "std": 0.1044},
                           "composite": {"mean": 0.6436, "std": 0.0077},
                           "last_stage_seconds": {"mean": 9.6, "std": 0.5}, "train_seconds": {"mean": 60.8, "std": 1.2}},
        },
        "comparisons": {
            "sftkey_tag - sft_tag": {
                "acc": {"mean": 0.2061, "ci": [-0.0411, 0.2876], "ci_items": [0.1, 0.3], "ci_both": [-0.0612, 0.3011],
                        "per_seed": [0.2512, 0.1611]},
                "composite": {"mean": -0.0712, "ci": [-0.1503, 0.0109], "per_seed": [0.0, 0.0]}},
            "sftkey_tag - sftsft_tag": {"acc": {"mean": -0.0334, "ci": [-0.0938, 0.0177], "per_seed": [-0.0334]}},
        },
    }


def test_a_missing_interval_names_its_reason():
    """Review (attack): two seeds and one test problem have no ci_both, and results.md said "one seed"."""
    c = E.paired_comparison(np.array([[1.0], [0.0]]), np.array([[0.0], [0.0]]), n_boot=10)
    assert c["ci"] is not None and c["ci_both"] is None
    assert E._diff(c, "ci_both") == "+0.500 (one test problem: no interval)"
    one_seed = E.paired_comparison(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]), n_boot=10)
    assert E._diff(one_seed) == "+0.500 (one seed: no interval)"


def test_markdown_shows_each_arm_and_comparison_with_sign_and_interval():
    text = E.markdown(_summary_by_hand(complete=True))
    lines = text.splitlines()
    assert lines[0].startswith("E1 = 7 steps, E2 = 3 steps, lr 0.002 (stage 2: 0.0002), λ = 2.5, batch 16x1, "
                               "seeds 4, 5, 12 test problems per seed")
    assert "incomplete" not in lines[0]
    assert "| sft | about-sft | 0.300 | - | - | - | 40 | 40 |" in lines  # one seed: no ±; untagged: no Fmt
    assert "| sft_tag | about-st | 0.412 ± 0.031 | 0.880 ± 0.012 | 0.553 ± 0.021 | - | 51 | 51 |" in lines
    assert "| sftkey_tag | about-key | 0.618 ± 0.045 | 0.703 ± 0.104 | 0.644 ± 0.008 | - | 10 | 61 |" in lines
    assert ("| sftkey_tag - sft_tag | +0.206 [-0.041, +0.288] | -0.071 [-0.150, +0.011] | +0.251, +0.161 | "
            "+0.206 [-0.061, +0.301] | +0.206 [+0.100, +0.300] |" in lines)
    assert ("| sftkey_tag - sftsft_tag | -0.033 [-0.094, +0.018] | - | -0.033 | -0.033 (one seed: no interval) | "
            "-0.033 (one seed: no interval) |" in lines)
    assert "123 paired bootstrap resamples" in text
    assert "(incomplete run)" in E.markdown(_summary_by_hand(complete=False)).splitlines()[0]
    assert "reasoning right" not in text and "ΔReasoning" not in text  # real data: no reasoning to score


def test_markdown_adds_the_reasoning_table_and_column_on_a_synthetic_task():
    summary = _summary_by_hand(complete=True)
    for name, (share, right, wrong) in {"sft_tag": (0.5, 0.9, 0.1), "sftkey_tag": (0.25, 0.8, None)}.items():
        summary["aggregates"][name].update(reasoning={"mean": share, "std": 0.01},
                                           acc_reasoning_right={"mean": right, "std": None},
                                           acc_reasoning_wrong={"mean": wrong, "std": None})
    summary["comparisons"]["sftkey_tag - sft_tag"]["reasoning"] = {"mean": -0.25, "ci": [-0.3, -0.2]}
    lines = E.markdown(summary).splitlines()
    assert "| arm | reasoning right | Acc, reasoning right | Acc, reasoning wrong |" in lines
    assert "| sft_tag | 0.500 ± 0.010 | 0.900 | 0.100 |" in lines and "| sftkey_tag | 0.250 ± 0.010 | 0.800 | - |" in lines
    assert not any(line.startswith("| sft |") and line.count("|") == 5 for line in lines)  # sft: none recorded
    assert ("| sftkey_tag - sft_tag | +0.206 [-0.041, +0.288] | -0.071 [-0.150, +0.011] | -0.250 [-0.300, -0.200] | "
            "+0.251, +0.161 | +0.206 [-0.061, +0.301] | +0.206 [+0.100, +0.300] |" in lines)
    assert "| sftkey_tag - sftsft_tag | -0.033 [-0.094, +0.018] | - | - | -0.033 |" in " ".join(lines)


def test_recorder_writes_every_file_after_each_arm_with_the_right_numbers(tmp_path):
    cfg = train.TrainConfig(out_dir=str(tmp_path / "exp"), seed=4, max_iters=6, stage2_iters=2)
    names, seeds = ["sft", "sft_tag", "sftkey_tag"], [4, 5]
    recorder = E.Recorder(cfg, names, seeds, n_boot=400)
    rng = np.random.default_rng(3)
    added, rows = {n: [] for n in names}, []
    for s in seeds:
        for j, name in enumerate(names):
            correct = rng.random(10) < 0.2 + 0.3 * j
            formatted = None if name == "sft" else rng.random(10) < 0.5 + 0.2 * j
            result = _result(s, correct, formatted, seconds=10.0 * (j + 1) + s, all_stages=100.0 * (j + 1) + s)
            arm_rows = [{"arm": name, "seed": s, "global_step": k, "step": k, "loss": float(j + k)} for k in range(2)]
            recorder.add(name, result, arm_rows)
            added[name].append(result)
            rows += arm_rows
            summary = json.loads((tmp_path / "exp" / "results.json").read_text())
            assert not summary["complete"] and summary["results"] == {n: r for n, r in added.items() if r}
            # a comparison appears only when both arms have every seed
            assert bool(summary["comparisons"]) == (s == seeds[-1] and name == "sftkey_tag")
    recorder.write(complete=True)
    out = tmp_path / "exp"
    summary = json.loads((out / "results.json").read_text())
    assert summary["complete"] and summary["seeds"] == seeds
    assert [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()] == rows
    for name in names:
        for key in ("acc", "fmt", "composite", "train_seconds", "last_stage_seconds"):
            values = [r[key] for r in added[name]]
            if values[0] is None:
                assert summary["aggregates"][name][key] == {"mean": None, "std": None}
                continue
            mean, std = _mean_std(values)
            assert summary["aggregates"][name][key] == {"mean": pytest.approx(mean), "std": pytest.approx(std)}
    assert set(summary["comparisons"]) == {"sftkey_tag - sft_tag"}
    c = summary["comparisons"]["sftkey_tag - sft_tag"]
    diff = _matrix(added["sftkey_tag"], "correct") - _matrix(added["sft_tag"], "correct")
    assert c["acc"]["mean"] == pytest.approx(diff.mean()) and c["acc"]["per_seed"] == pytest.approx(diff.mean(axis=1))

    lines = (out / "results.md").read_text().splitlines()
    acc_mean, acc_std = _mean_std([r["acc"] for r in added["sftkey_tag"]])
    assert any(line.startswith(f"| sftkey_tag | {E.ABOUT['sftkey_tag']} | {acc_mean:.3f} ± {acc_std:.3f} |")
               for line in lines)
    assert any(line.startswith(f"| sftkey_tag - sft_tag | {diff.mean():+.3f} [") for line in lines)


# ---------------------------------------------------------------------------------------------
# Arm definitions

def test_arms_follow_the_weights_lambda_and_stage2_lr():
    cfg = train.TrainConfig(max_iters=9, stage2_iters=5, lr=2e-3, stage2_lr=4e-4, key_weight=2.5)
    stages = {n: E.arm_stages(cfg, n) for n in E.ARM_NAMES}
    assert stages["weighted"] == [sftkey.Stage("w0-1-2.5_tag", (0.0, 1.0, 2.5), 14, 2e-3)]
    first = sftkey.Stage("sft_tag", (0.0, 1.0, 1.0), 9, 2e-3)
    assert stages["sftkey_tag"] == [first, sftkey.Stage("sftkey_tag", (0.0, 0.0, 1.0), 5, 4e-4)]
    assert stages["sftsft_tag"] == [first, sftkey.Stage("sftsft_tag", (0.0, 1.0, 1.0), 5, 4e-4)]
    assert stages["sftdft_tag"] == [first, sftkey.Stage("sftdft_tag", (0.0, 1.0, 1.0), 5, 4e-4, dft=True)]
    assert stages["key_tag"] == [sftkey.Stage("key_tag", (0.0, 0.0, 1.0), 9, 2e-3)]
    assert stages["sft_tag_e1e2"] == [sftkey.Stage("sft_tag", (0.0, 1.0, 1.0), 14, 2e-3)]  # weighted's schedule, λ 1
    every = [s for plan in stages.values() for s in plan]
    assert every.count(first) == 4 and len(set(every)) == len(every) - 3  # only sft_tag's stage is shared (by 4 arms)
    # without --stage2_lr, stage 2's peak is where stage 1's schedule ended
    default = dataclasses.replace(cfg, stage2_lr=0.0)
    assert E.arm_stages(default, "sftkey_tag")[1].lr == pytest.approx(2e-3 * cfg.min_lr_ratio)


# ---------------------------------------------------------------------------------------------
# run_seed: data stream, initial weights, timing (train.train and train.evaluate stood in for)

E1, E2 = 3, 2
STAGES = {"sft": "sft", "sft_tag": "sft_tag", "key_tag": "key_tag", "sftkey_tag": "sftkey_tag",
          "sftsft_tag": "sftsft_tag", "sftdft_tag": "sftdft_tag", "weighted": "w0-1-3_tag"}  # each arm's last stage
CODE = {"sft": 1, "sft_tag": 2, "key_tag": 4, "sftkey_tag": 8, "sftsft_tag": 16, "w0-1-3_tag": 32, "sftdft_tag": 64,
        "a": 1, "b": 2, "b2": 4, "c": 8}  # per stage: the mark added to the weights and the seconds taken


@pytest.fixture(scope="module")
def enc():
    return D.get_encoding(D.SYNTHETIC_ENCODING)


@pytest.fixture
def cfg(tmp_path):
    return train.TrainConfig(out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=16, block_size=64, n_train=100,
                             n_val=10, n_test=4, max_iters=E1, stage2_iters=E2, batch_size=8, warmup_iters=1,
                             eval_interval=100, log_interval=100, device="cpu", seed=11, key_weight=3.0)


def _fingerprint(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


@pytest.fixture
def fakes(monkeypatch):
    """train.train adds CODE[stage] to every weight and advances a fake clock by CODE[stage] seconds;
    train.evaluate returns fixed scores. Both record what they were given."""
    calls, evals, clock = [], [], [1000.0]

    def fake_train(**kw):
        kw = stage_fields(kw)
        calls.append({**kw, "start": _fingerprint(kw["model"])})
        with torch.no_grad():
            for p in kw["model"].parameters():
                p.add_(CODE[kw["stage"]])
        calls[-1]["end"] = _fingerprint(kw["model"])
        kw["log"] += [{"stage": kw["stage"], "step": s, "val_thinking": 1.0, "val_key": 2.0} for s in range(kw["iters"])]
        clock[0] += CODE[kw["stage"]]
        return None

    def fake_evaluate(model, enc, examples, cfg, device, dtype):
        evals.append({"weights": _fingerprint(model), "n": len(examples)})
        tagged = not cfg.untagged
        n = len(examples)  # one score and one response per problem, as train.evaluate gives
        return {"acc": 0.5, "fmt": 1.0 if tagged else None, "composite": 0.65 if tagged else None, "n": n,
                "correct": [i % 2 == 0 for i in range(n)], "formatted": [True] * n if tagged else None,
                "responses": [{"response": ""}] * n}

    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    monkeypatch.setattr(E, "time", types.SimpleNamespace(time=lambda: clock[0]))
    return types.SimpleNamespace(calls=calls, evals=evals)


def _run_seed(cfg, enc, names):
    out = []
    E.run_seed(cfg, names, enc, "cpu", torch.float32, lambda *args: out.append(args))
    return out


def test_arms_that_continue_a_shared_stage_read_the_data_stream_after_it(cfg, enc, fakes):
    out = _run_seed(cfg, enc, list(STAGES))
    by = {c["stage"]: c for c in fakes.calls}
    assert [c["stage"] for c in fakes.calls] == list(STAGES.values())  # sft_tag's stage once, for four arms
    expected = {"sft": (0, E1), "sft_tag": (0, E1), "key_tag": (0, E1), "sftkey_tag": (E1, E2),
                "sftsft_tag": (E1, E2), "sftdft_tag": (E1, E2), "w0-1-3_tag": (0, E1 + E2)}  # (steps_before, iters)
    for arm, stage in STAGES.items():
        c, planned = by[stage], E.arm_stages(cfg, arm)[-1]
        assert (c["steps_before"], c["iters"]) == expected[stage], stage
        assert (c["weights"], c["peak_lr"], c["dft"]) == (planned.weights, planned.lr, planned.dft), stage
        assert c["cfg"].untagged == (arm == "sft") and c["cfg"].seed == cfg.seed, stage
    assert [c["stage"] for c in fakes.calls if c["dft"]] == ["sftdft_tag"]  # the DFT control's loss reaches the loop
    # each arm's rows hold all its stages, at global steps that continue one another
    rows = {name: r for name, _, r in out}
    assert [r["global_step"] for r in rows["sftkey_tag"]] == list(range(E1 + E2))
    assert [r["stage"] for r in rows["sftkey_tag"]] == ["sft_tag"] * E1 + ["sftkey_tag"] * E2
    assert [r["global_step"] for r in rows["weighted"]] == list(range(E1 + E2))
    assert all(r["arm"] == name and r["seed"] == cfg.seed for name, rs in rows.items() for r in rs)


def test_root_arms_share_the_seeded_init_and_continuing_arms_start_from_the_shared_stage(cfg, enc, fakes):
    torch.manual_seed(cfg.seed)
    init = _fingerprint(checkpoints.build_model(cfg, enc, "cpu"))
    torch.manual_seed(12345)  # the arms must not depend on the RNG state they find
    _run_seed(cfg, enc, list(STAGES))
    by = {c["stage"]: c for c in fakes.calls}
    for root in ("sft", "sft_tag", "key_tag", "w0-1-3_tag"):
        assert torch.equal(by[root]["start"], init), root
    for second in ("sftkey_tag", "sftsft_tag", "sftdft_tag"):  # sft_tag's final weights, not key_tag's or a fresh init
        assert torch.equal(by[second]["start"], by["sft_tag"]["end"]), second
        assert torch.allclose(by[second]["start"], init + CODE["sft_tag"])
    # each arm is evaluated with the weights its last stage ended with
    assert [torch.equal(e["weights"], by[STAGES[n]]["end"]) for e, n in zip(fakes.evals, STAGES)] == [True] * 7


def test_an_arm_made_of_stages_already_trained_trains_nothing(cfg, enc, fakes):
    out = _run_seed(cfg, enc, ["sftkey_tag", "sft_tag"])
    assert [c["stage"] for c in fakes.calls] == ["sft_tag", "sftkey_tag"]
    by = {c["stage"]: c for c in fakes.calls}
    assert torch.equal(fakes.evals[1]["weights"], by["sft_tag"]["end"])  # the arm sft_tag: the kept weights
    results = {name: r for name, r, _ in out}
    assert (results["sft_tag"]["train_seconds"], results["sft_tag"]["last_stage_seconds"]) == (2, 2)


def test_chains_of_shared_stages_count_steps_and_seconds_over_all_stages(cfg, enc, fakes, monkeypatch):
    w = sftkey.role_weights()
    a, b, b2, c = (sftkey.Stage(n, w, k, 1e-3) for n, k in (("a", 3), ("b", 2), ("b2", 4), ("c", 1)))
    plans = {"A": [a], "B": [a, b, b2], "C": [a, b, c]}
    monkeypatch.setattr(E, "arm_stages", lambda cfg, name, before="": plans[name])
    monkeypatch.setattr(E, "arm_config", lambda cfg, name: cfg)
    out = _run_seed(cfg, enc, ["A", "B", "C"])
    assert [(k["stage"], k["steps_before"]) for k in fakes.calls] == [("a", 0), ("b", 3), ("b2", 5), ("c", 5)]
    by = {k["stage"]: k for k in fakes.calls}
    assert torch.equal(by["c"]["start"], by["b"]["end"])  # C continues the kept a -> b, not B's b2
    results = {name: r for name, r, _ in out}
    # seconds taken (the fake clock): a 1, b 2, b2 4, c 8
    assert [results[n]["last_stage_seconds"] for n in "ABC"] == [1, 4, 8]
    assert [results[n]["train_seconds"] for n in "ABC"] == [1, 7, 11]
    assert [results[n]["steps"] for n in "ABC"] == [3, 9, 6]
    assert all(results[n]["seed"] == cfg.seed for n in "ABC")


def test_experiment_runs_consecutive_seeds_with_different_inits(cfg, enc, fakes, monkeypatch):
    monkeypatch.setattr(E, "plot", lambda *args: [])
    summary = E.run_experiment(cfg, ["sftkey_tag"], n_seeds=3, n_boot=50)
    seeds = [cfg.seed, cfg.seed + 1, cfg.seed + 2]
    assert summary["seeds"] == seeds
    assert [(c["stage"], c["cfg"].seed) for c in fakes.calls] == [
        (stage, s) for s in seeds for stage in ("sft_tag", "sftkey_tag")]
    assert [r["seed"] for r in summary["results"]["sftkey_tag"]] == seeds
    starts = [c["start"] for c in fakes.calls if c["stage"] == "sft_tag"]
    for s, start in zip(seeds, starts):
        torch.manual_seed(s)
        assert torch.equal(start, _fingerprint(checkpoints.build_model(cfg, enc, "cpu")))
    assert not torch.equal(starts[0], starts[1])


def test_real_loop_second_stage_reads_the_batches_after_the_first(cfg, enc, monkeypatch):
    monkeypatch.setattr(train, "evaluate", lambda model, enc, examples, *args, **kw: {
        "acc": 0.0, "fmt": 0.0, "composite": 0.0, "n": len(examples), "correct": [False] * len(examples),
        "formatted": [False] * len(examples), "responses": [{"response": ""}] * len(examples)})
    read, original = [], D.Batches.get

    def recording(self, i, device, **split):
        read.append((self.seed, i))
        return original(self, i, device, **split)
    monkeypatch.setattr(D.Batches, "get", recording)
    _run_seed(cfg, enc, ["sft_tag", "sftkey_tag"])
    assert read == [(cfg.seed, i) for i in range(E1 + E2)]  # one stream: E1 batches, then the next E2


# ---------------------------------------------------------------------------------------------
# Validation curves

def test_val_curves_follow_each_arm_over_its_stages_and_average_over_seeds():
    def val(arm, seed, step, thinking, key):
        return {"arm": arm, "seed": seed, "global_step": step, "stage": arm, "step": step,
                "val_thinking": thinking, "val_key": key}
    rows = [val("sft_tag", 0, 0, 4.0, 8.0), val("sft_tag", 1, 0, 2.0, 6.0),
            val("sft_tag", 0, 2, 1.0, 3.0), val("sft_tag", 1, 2, 3.0, 5.0),
            {"arm": "sft_tag", "seed": 0, "global_step": 1, "step": 1, "loss": 9.0},  # a loss row: not a curve point
            val("sftkey_tag", 1, 4, 0.5, 1.5), val("sftkey_tag", 0, 3, 0.25, 1.0), val("sftkey_tag", 1, 3, 0.75, 2.0),
            val("weighted", 0, 1, 7.0, 7.5)]
    curves = E._val_curves(rows)
    assert curves["sft_tag"]["thinking"] == ([0, 2], [3.0, 2.0])
    assert curves["sft_tag"]["key"] == ([0, 2], [7.0, 4.0])
    # an arm's curve is its own rows only (run_seed gives it those of the stages it shares): means over
    # seeds at each global step, seed 0 having none at step 4; nothing borrowed from another arm
    assert curves["sftkey_tag"]["thinking"] == ([3, 4], [0.5, 0.5])
    assert curves["sftkey_tag"]["key"] == ([3, 4], [1.5, 1.5])
    assert curves["weighted"] == {"thinking": ([1], [7.0]), "key": ([1], [7.5])}
