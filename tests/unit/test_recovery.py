"""The dataset law recovered from synthetic runs of several truths, at the default sweep's grid
and at the paper's token counts (1e9-1e11): noiseless data give every coefficient within 1%;
with 0.5% noise the 95% profile intervals cover the truth in at least 17 of 20 seeds and a
held-out corner is predicted within 1%. And the statuses that say when a fit is not to be
trusted: an optimum on a bound (E -> 0, the "more data never hurts" prior when the truth
breaks it) or a singular J^T J, and the sweep extension that identifies a loose parameter."""

import math

import numpy as np
import pytest

from upcycling.analysis import laws
from upcycling.analysis.fitting import fit_law

GRIDS = {
    "default": (np.array([65536.0, 131072.0, 262144.0]), np.array([32768.0, 65536.0, 131072.0, 262144.0])),
    "paper": (np.geomspace(1e9, 1e11, 4), np.geomspace(1e9, 1e11, 5)),
}
# (term at the grid's centre, local D1 slope there, local D2 slope there, alpha3, E)
SHAPES = {
    "typical": (1.5, 0.1, 0.3, 0.02, 2.5),
    "crossing": (1.5, 0.0, 0.3, 0.05, 2.5),  # the D1 curves cross at the centre of the D2 range
    "weak": (1.5, 0.15, 0.3, 0.002, 2.5),  # a weak interaction
}
TRUTHS = [(grid, shape) for grid in GRIDS for shape in SHAPES]


def truth(grid: str, shape: str) -> dict[str, float]:
    """Natural-unit coefficients of the dataset law with the given shape on that grid."""
    d1s, d2s = GRIDS[grid]
    term, slope1, slope2, alpha3, floor = SHAPES[shape]
    d1c, d2c = math.exp(np.log(d1s).mean()), math.exp(np.log(d2s).mean())
    alpha1, alpha2 = slope1 + alpha3 * math.log(d2c), slope2 + alpha3 * math.log(d1c)
    amplitude = term * math.exp(alpha1 * math.log(d1c) + slope2 * math.log(d2c))
    return dict(A=amplitude, alpha1=alpha1, alpha2=alpha2, alpha3=alpha3, E=floor)


def runs(grid: str, params: dict, noise: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    d1, d2 = (a.ravel() for a in np.meshgrid(*GRIDS[grid], indexing="ij"))
    loss = laws.dataset(d1, d2, **params)
    if noise:
        loss = loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, loss.shape))
    return {"d1": d1, "d2": d2, "loss": loss}


def test_the_truths_are_what_they_claim():
    for grid in GRIDS:
        params = truth(grid, "crossing")
        data = runs(grid, params)
        d1s, d2s = GRIDS[grid]
        at_low = laws.dataset(d1s, d2s.min(), **params)
        at_high = laws.dataset(d1s, d2s.max(), **params)
        assert np.all(np.diff(at_low) < 0) and np.all(np.diff(at_high) > 0)  # curves cross
        assert np.all(data["loss"] < math.log(2048))  # a real loss: below a uniform guess
        # the paper's ordering holds; the bounded fit of old could not reach these exponents
        assert params["alpha2"] > params["alpha1"] > params["alpha3"] > 0


@pytest.mark.parametrize("grid, shape", TRUTHS)
def test_noiseless_data_give_every_coefficient_within_one_percent(grid, shape):
    params = truth(grid, shape)
    result = fit_law("dataset", runs(grid, params), n_bootstrap=0, holdout=False)
    assert result.status == "converged", result.status_detail
    for name, value in params.items():
        assert result.params[name] == pytest.approx(value, rel=0.01), name


# The intervals are the profile's: the bootstrap (n_bootstrap) adds nothing they use, so it is off.
@pytest.mark.slow  # about 10 s per truth: 20 noisy fits with profile intervals
@pytest.mark.parametrize("grid, shape", TRUTHS)
def test_noisy_data_intervals_cover_and_the_corner_is_predicted(grid, shape):
    """0.5% noise, 20 seeds; Huber delta at the noise level (1e-2: at 1e-3 the fit is nearly
    L1, slower, and at the default grid misses the corner by up to 1.6% in 3 of 20 seeds)."""
    params = truth(grid, shape)
    covered = {name: 0 for name in params}
    within = 0
    for seed in range(20):
        data = runs(grid, params, noise=0.005, seed=seed)
        result = fit_law("dataset", data, n_bootstrap=0, seed=seed, holdout=False, n_starts=6, huber_delta=1e-2)
        for name, value in params.items():
            low, high = result.interval[name]
            covered[name] += low <= value <= high
        corner = (data["d1"] == data["d1"].max()) & (data["d2"] == data["d2"].max())
        rest = fit_law(
            "dataset",
            {k: v[~corner] for k, v in data.items()},
            n_bootstrap=0,
            holdout=False,
            n_starts=6,
            huber_delta=1e-2,
        )
        true_corner = laws.dataset(data["d1"][corner], data["d2"][corner], **params)
        within += abs(rest.predict(d1=data["d1"][corner], d2=data["d2"][corner])[0] / true_corner[0] - 1) < 0.01
    # profile intervals are exact-size, not conservative like the bootstrap they replaced: a 95%
    # interval misses 4+ of 20 with probability 1.6% (benchmarks/coverage_study.py measures more)
    assert all(count >= 17 for count in covered.values()), covered
    assert within >= 18, f"corner within 1% in {within} of 20 seeds"


@pytest.mark.slow
@pytest.mark.parametrize("grid, shape", TRUTHS)
def test_coverage_with_the_default_huber_delta(grid, shape):
    params = truth(grid, shape)
    covered = {name: 0 for name in params}
    for seed in range(20):
        result = fit_law(
            "dataset", runs(grid, params, noise=0.005, seed=seed), n_bootstrap=0, seed=seed, holdout=False, n_starts=6
        )
        for name, value in params.items():
            covered[name] += result.interval[name][0] <= value <= result.interval[name][1]
    # Exact-size 95% profile intervals: 18 of 20 per parameter would fail 7.5% of calibrated cases, so
    # the pooled coverage carries the claim (below 88 of 100 with probability 0.2% when calibrated)
    # and each parameter only has to be far from broken (below 15 of 20: 0.03%).
    assert sum(covered.values()) >= 0.88 * 20 * len(params), covered
    assert all(count >= 15 for count in covered.values()), covered


def test_a_vanishing_floor_is_a_fit_on_its_bound():
    params = dict(truth("default", "typical"), E=1e-9)
    result = fit_law("dataset", runs("default", params), n_bootstrap=8, holdout=False)
    assert result.status == "at_bound" and not result.converged
    assert "E" in result.at_bound and "E >= 0" in result.at_bound["E"]
    assert result.identification["E"]["identified"] is False
    for name in ("alpha1", "alpha2", "alpha3"):  # the rest is still recovered
        assert result.params[name] == pytest.approx(params[name], rel=0.01)


def test_the_monotone_prior_is_explicit_and_reported_when_active():
    params = truth("default", "crossing")
    data = runs("default", params)
    free = fit_law("dataset", data, n_bootstrap=0, holdout=False)
    assert free.status == "converged" and free.prior == {}
    # a truth whose local D1 slope is 0 at the centre: with noise pushing it below 0, the
    # prior holds it at 0 and says so
    data_below = runs("default", truth("default", "crossing") | {"alpha1": params["alpha1"] - 0.02})
    bounded = fit_law("dataset", data_below, n_bootstrap=0, holdout=False, monotone=True)
    assert bounded.prior["name"] == "more data never hurts"
    assert bounded.prior["active"] == ["alpha1"]
    assert bounded.status == "at_bound" and "prior" in bounded.at_bound["alpha1"]
    unbounded = fit_law("dataset", data_below, n_bootstrap=0, holdout=False)
    assert unbounded.status == "converged"
    assert unbounded.params["alpha1"] == pytest.approx(params["alpha1"] - 0.02, rel=0.01)


def test_a_singular_fit_says_so():
    """D2 = D1 at every run: alpha1 and alpha2 (and the interaction) cannot be told apart."""
    d = np.geomspace(3e4, 3e5, 8)
    loss = laws.dataset(d, d, **truth("default", "typical"))
    result = fit_law("dataset", {"d1": d, "d2": d, "loss": loss}, n_bootstrap=0, holdout=False)
    assert result.status in ("singular", "at_bound") and not result.converged
    assert "singular" in result.status_detail or "singular" in result.stderr_note


def test_the_suggested_extension_identifies_a_loose_parameter():
    """A law whose floor E the default grid leaves open: the suggested runs, added, shrink
    E's interval as predicted (within a factor 2)."""
    params = dict(truth("default", "typical"), E=2.5, alpha3=0.0)
    data = runs("default", params, noise=0.004, seed=3)
    result = fit_law("dataset", data, n_bootstrap=32, seed=1, holdout=False)
    loose = result.not_identified()
    assert loose, result.identification
    name = loose[0]
    entry = result.identification[name]
    assert entry["extension"], entry
    points = entry["points"]
    extra = laws.dataset(np.array(points["d1"]), np.array(points["d2"]), **params)
    extra = extra * np.exp(np.random.default_rng(4).normal(0.0, 0.004, extra.shape))
    extended = {
        "d1": np.concatenate([data["d1"], points["d1"]]),
        "d2": np.concatenate([data["d2"], points["d2"]]),
        "loss": np.concatenate([data["loss"], extra]),
    }
    refit = fit_law("dataset", extended, n_bootstrap=32, seed=1, holdout=False)
    before, after = entry["interval"], refit.identification[name]["interval"]
    predicted = entry["predicted_interval"]

    def width(pair):
        return math.log(pair[1] / pair[0]) if name in ("A", "E") else pair[1] - pair[0]

    assert width(after) < width(before)
    assert width(after) < 2 * width(predicted)
