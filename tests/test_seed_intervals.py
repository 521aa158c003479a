"""The experiment's confidence interval over seeds: `t_quantile` and `paired_comparison`'s `ci`.

`ci` is a t-interval over the per-seed mean differences (what varies from seed to seed, each seed's
test problems already averaged in); `ci_items`, the paired bootstrap over test problems only, ignores
the seeds and is far too narrow when they disagree. The simulation at the end is the issue's case: no
true difference, per-seed shifts of sd 0.10 shared by every item of a seed, 3 seeds of 500 items.
"""
import math

import numpy as np
import pytest

import experiment as E


# ---------------------------------------------------------------------------------------------
# t_quantile

@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)])
def test_t_quantile_matches_the_tables_at_97_5_percent(df, expected):
    """The 0.975-quantile of Student's t (the two-sided 95% critical value) as printed in t tables."""
    assert E.t_quantile(0.975, df) == pytest.approx(expected, abs=1.5e-3)


def test_t_quantile_other_levels_and_the_normal_limit():
    """Other points of the tables (the 0.95 and 0.995 quantiles), and the normal quantile for large df."""
    assert E.t_quantile(0.95, 1) == pytest.approx(6.314, abs=2e-3)
    assert E.t_quantile(0.95, 10) == pytest.approx(1.812, abs=2e-3)
    assert E.t_quantile(0.995, 2) == pytest.approx(9.925, abs=3e-3)
    assert E.t_quantile(0.995, 1) == pytest.approx(63.657, abs=0.05)  # the hardest: the heaviest tail
    assert E.t_quantile(0.975, 100_000) == pytest.approx(1.95996, abs=2e-3)


def test_t_quantile_falls_with_df_and_rises_with_p():
    """Heavier tails with fewer degrees of freedom: the quantile falls strictly as df grows."""
    by_df = [E.t_quantile(0.975, df) for df in (1, 2, 3, 4, 5, 8, 12, 20, 30, 60, 200)]
    assert all(x > y for x, y in zip(by_df, by_df[1:])), by_df
    assert by_df[-1] > 1.959  # and never below the normal's
    by_p = [E.t_quantile(p, 3) for p in (0.6, 0.75, 0.9, 0.95, 0.975, 0.99)]
    assert all(x < y for x, y in zip(by_p, by_p[1:])), by_p


@pytest.mark.parametrize("p", [0.5, 0.3, 1.0, 1.5])
def test_t_quantile_refuses_p_outside_its_range(p):
    with pytest.raises(ValueError):
        E.t_quantile(p, 3)


# ---------------------------------------------------------------------------------------------
# paired_comparison's ci

def test_ci_is_the_t_interval_over_per_seed_mean_differences():
    """ci = mean ± t(0.975, S-1) · sd(per-seed differences, ddof 1) / sqrt(S), on a hand-made array."""
    b = np.zeros((4, 5))
    a = np.array([[1, 0, 0, 0, 0],      # +0.2
                  [1, 1, 1, 0, 0],      # +0.6
                  [0, 0, 0, 0, 0],      # 0
                  [1, 1, 0, 0, 0]], dtype=float)  # +0.4
    c = E.paired_comparison(a, b, n_boot=200)
    per_seed = np.array([0.2, 0.6, 0.0, 0.4])
    assert c["per_seed"] == pytest.approx(per_seed)
    mean, sd = per_seed.mean(), per_seed.std(ddof=1)
    half = 3.182446 * sd / math.sqrt(4)  # t(0.975, 3) from the tables: 3.182
    assert c["mean"] == pytest.approx(0.3)
    assert c["ci"] == pytest.approx([mean - half, mean + half], abs=2e-4)
    assert c["ci"] == pytest.approx([mean - E.t_quantile(0.975, 3) * sd / 2, mean + E.t_quantile(0.975, 3) * sd / 2])
    # not the normal interval, not the population sd
    assert c["ci"][1] - c["ci"][0] > 2 * 1.96 * sd / 2 * 1.5
    assert c["ci"][1] - c["ci"][0] != pytest.approx(2 * 3.182446 * per_seed.std(ddof=0) / 2, abs=1e-3)
    # the bootstrap over items is something else, kept beside it
    assert c["ci_items"] != pytest.approx(c["ci"])


def test_ci_follows_the_level():
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 40)), rng.random((3, 40))
    per_seed = (a - b).mean(axis=1)
    for level in (0.9, 0.95, 0.99):
        c = E.paired_comparison(a, b, n_boot=100, level=level)
        half = E.t_quantile(1 - (1 - level) / 2, 2) * per_seed.std(ddof=1) / math.sqrt(3)
        assert c["ci"] == pytest.approx([per_seed.mean() - half, per_seed.mean() + half])
    widths = [np.diff(E.paired_comparison(a, b, n_boot=100, level=lv)["ci"])[0] for lv in (0.9, 0.95, 0.99)]
    assert widths[0] < widths[1] < widths[2]


def test_ci_is_none_with_one_seed_but_ci_items_is_given():
    """One seed: no seed-to-seed variation to estimate, so no `ci`; the item bootstrap is still there."""
    a = np.zeros((1, 50))
    a[0, :20] = 1
    c = E.paired_comparison(a, np.zeros((1, 50)), n_boot=300)
    assert c["ci"] is None and c["n_seeds"] == 1
    assert c["ci_items"][0] < 0.4 < c["ci_items"][1] and c["mean"] == pytest.approx(0.4)


def test_ci_of_seeds_that_agree_exactly_has_zero_width():
    """Every seed's mean difference the same: the t-interval is the point (whatever the items do)."""
    rng = np.random.default_rng(0)
    b = rng.integers(0, 2, size=(3, 20)).astype(float)
    a = b.copy()
    for k in range(3):  # each seed gains on a different 5 items: per-seed means all +0.25, item means differ
        a[k, 5 * k:5 * k + 5] = b[k, 5 * k:5 * k + 5] + 1
    c = E.paired_comparison(a, b, n_boot=300)
    assert c["per_seed"] == pytest.approx([0.25] * 3)
    assert c["ci"] == pytest.approx([0.25, 0.25])
    assert c["ci_items"][1] - c["ci_items"][0] > 0.05


def test_ci_is_wide_when_seeds_disagree_though_items_agree():
    """Seeds +0.3, -0.1, +0.1 on every item: the item bootstrap is a point, the t-interval is wide."""
    b = np.zeros((3, 30))
    a = b + np.array([[0.3], [-0.1], [0.1]])
    c = E.paired_comparison(a, b, n_boot=300)
    assert c["ci_items"] == pytest.approx([0.1, 0.1])
    half = E.t_quantile(0.975, 2) * 0.2 / math.sqrt(3)  # sd of (0.3, -0.1, 0.1) is 0.2
    assert c["ci"] == pytest.approx([0.1 - half, 0.1 + half])
    assert c["ci"][0] < 0 < c["ci"][1]


# ---------------------------------------------------------------------------------------------
# Coverage by simulation (the case)

def _simulate(rng, n_seeds=3, n_items=500, shift_sd=0.10):
    """One experiment with no true difference between the arms: arm a's item scores are Bernoulli(0.5 + s_k),
    s_k ~ N(0, shift_sd) drawn once per seed (shared by all its items), arm b's Bernoulli(0.5)."""
    shifts = rng.normal(0.0, shift_sd, size=(n_seeds, 1))
    a = (rng.random((n_seeds, n_items)) < np.clip(0.5 + shifts, 0, 1)).astype(float)
    b = (rng.random((n_seeds, n_items)) < 0.5).astype(float)
    return a, b


def test_the_seed_interval_covers_a_null_difference_about_95_percent_of_the_time():
    """200 simulated null experiments: `ci` excludes 0 about 5% of the time (2 to 20 of 200); `ci_items`,
    blind to the per-seed shifts, excludes it far more often (the issue measured 105/200)."""
    rng = np.random.default_rng(20240611)
    excluded_t = excluded_items = 0
    for k in range(200):
        a, b = _simulate(rng)
        c = E.paired_comparison(a, b, n_boot=200, seed=k)
        excluded_t += not c["ci"][0] <= 0 <= c["ci"][1]
        excluded_items += not c["ci_items"][0] <= 0 <= c["ci_items"][1]
    assert 2 <= excluded_t <= 20, excluded_t
    assert excluded_items > 40, excluded_items
    assert excluded_items > 3 * excluded_t


def test_ci_at_levels_above_99_percent():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 20)), np.zeros((3, 20))
    narrow = E.paired_comparison(a, b, n_boot=50, level=0.99)["ci"]
    wide = E.paired_comparison(a, b, n_boot=50, level=0.999)["ci"]
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


# ---------------------------------------------------------------------------------------------
# ci_both: other seeds and other test problems

def _anova_variances(d: np.ndarray) -> tuple[float, float]:
    """The seeds' and the problems' shares of the variance of the mean of d (seeds x problems), from the two-way
    ANOVA mean squares: MS_seeds / (S N) and max(MS_problems - MS_residual, 0) / (S N)."""
    S, N = d.shape
    grand, rows, cols = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_rows = N * ((rows - grand) ** 2).sum() / (S - 1)
    ms_cols = S * ((cols - grand) ** 2).sum() / (N - 1)
    ms_res = ((d - rows[:, None] - cols[None, :] + grand) ** 2).sum() / ((S - 1) * (N - 1))
    return ms_rows / (S * N), max(ms_cols - ms_res, 0.0) / (S * N)


@pytest.mark.parametrize("level", [0.9, 0.95])
def test_ci_both_is_the_t_interval_of_the_seeds_and_the_problems_variance(level):
    """ci_both = mean ± t(level, S-1) · sqrt(seeds' + problems' share), the shares from the ANOVA mean squares;
    never narrower than ci; none with one seed or one problem."""
    rng = np.random.default_rng(5)
    a = rng.random((4, 30)) + rng.normal(0, 0.3, size=(1, 30))  # the problems differ between the arms
    b = rng.random((4, 30))
    seeds_share, problems_share = _anova_variances(a - b)
    assert seeds_share > 0 and problems_share > 0
    c = E.paired_comparison(a, b, n_boot=100, level=level)
    half = E.t_quantile(1 - (1 - level) / 2, 3) * math.sqrt(seeds_share + problems_share)
    assert c["ci_both"] == pytest.approx([c["mean"] - half, c["mean"] + half])
    assert c["ci_both"][0] < c["ci"][0] < c["mean"] < c["ci"][1] < c["ci_both"][1]
    assert E.paired_comparison(a[:1], b[:1], n_boot=100)["ci_both"] is None
    assert E.paired_comparison(a[:, :1], b[:, :1], n_boot=100)["ci_both"] is None


def test_ci_both_of_seeds_that_agree_exactly_is_the_problems_interval():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 2, size=(3, 20)).astype(float)
    a = b.copy()
    for k in range(3):  # as above: per-seed means all +0.25, so ci is a point
        a[k, 5 * k:5 * k + 5] = b[k, 5 * k:5 * k + 5] + 1
    c = E.paired_comparison(a, b, n_boot=100)
    half = E.t_quantile(0.975, 2) * math.sqrt(sum(_anova_variances(a - b)))
    assert c["ci"] == pytest.approx([0.25, 0.25]) and c["ci_both"] == pytest.approx([0.25 - half, 0.25 + half])


@pytest.mark.parametrize("problem_sd, noise_sd, ci_misses, both_misses",
                         [(0.0, 0.3, (2, 25), (2, 25)), (0.3, 0.1, (40, 200), (0, 25))])
def test_ci_both_covers_the_problems_not_drawn(problem_sd, noise_sd, ci_misses, both_misses):
    """200 simulated experiments whose arms differ by 0 on average over all problems; on problem i by
    d_i ~ N(0, problem_sd), 100 problems drawn once and shared by 3 seeds (seed shift sd 0.01, noise sd noise_sd).
    Without problem effects both intervals miss the 0 about 5% of the time (measured: 15 and 11); with them
    `ci`, blind to which problems were drawn, misses it often (73), `ci_both` rarely: with the seeds' 2 degrees
    of freedom it is conservative when the problems' share dominates (0)."""
    rng = np.random.default_rng(11)
    missed_ci = missed_both = 0
    for k in range(200):
        d = rng.normal(0.0, problem_sd, size=(1, 100))
        diff = d + rng.normal(0.0, 0.01, size=(3, 1)) + rng.normal(0.0, noise_sd, size=(3, 100))
        c = E.paired_comparison(diff, np.zeros_like(diff), n_boot=20, seed=k)
        missed_ci += not c["ci"][0] <= 0 <= c["ci"][1]
        missed_both += not c["ci_both"][0] <= 0 <= c["ci_both"][1]
    assert ci_misses[0] <= missed_ci <= ci_misses[1], missed_ci
    assert both_misses[0] <= missed_both <= both_misses[1], missed_both
