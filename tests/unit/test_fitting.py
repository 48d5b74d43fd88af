"""Fitting: the Chinchilla replication, recovery of known coefficients (several truths of the
dataset law at the default grid and at the paper's token counts, including D1 curves that cross
inside the data and a weak interaction), bootstrap coverage, held-out prediction, statuses that
say when a fit is on a bound or singular, robustness to outliers, and clear errors for data
that cannot identify a law."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from unit.test_laws import TRUE_PARAMS
from upcycling.analysis import diagnostics
from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitting import check_data, fit_law, huber
from upcycling.analysis.laws import LAWS

DATA = Path(__file__).parents[1] / "data" / "chinchilla_epoch_svg_extracted.csv"
TOKENS = np.geomspace(6.5e4, 2.1e6, 6)
SIZES = np.array([1e5, 4e5, 1.6e6, 6.4e6])


def design_points(name):
    """A grid of the law's variables covering the tiny-model sweeps of this project."""
    variables = LAWS[name].variables
    if variables == ("d1", "d2"):
        axes = (TOKENS, TOKENS)
    elif variables == ("d1", "d2", "n1"):
        axes = (TOKENS[::2], TOKENS, SIZES)
    elif variables == ("p", "n2"):
        axes = (np.array([1.0, 2.0, 4.0, 8.0, 16.0]), SIZES)
    elif variables == ("n", "d"):
        axes = (SIZES, TOKENS)
    else:
        axes = (TOKENS,)
    grids = np.meshgrid(*axes, indexing="ij")
    return {v: g.ravel() for v, g in zip(variables, grids)}


def synthetic(name, noise=0.0, seed=0):
    points = design_points(name)
    loss = LAWS[name].predict(TRUE_PARAMS[name], **points)
    if noise:
        loss = loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, loss.shape))
    return {**points, "loss": loss}


def test_huber():
    r = np.array([-2e-3, -1e-3, 0.0, 5e-4, 3e-3])
    expected = [1e-3 * (2e-3 - 5e-4), 0.5e-6, 0.0, 0.5 * 25e-8, 1e-3 * (3e-3 - 5e-4)]
    np.testing.assert_allclose(huber(r, 1e-3), expected, rtol=1e-12)


def test_chinchilla_replication():
    """Epoch AI's fit of the Chinchilla data (arXiv 2404.10102): E 1.8172, A 482.01,
    B 2085.43, alpha 0.3478, beta 0.3658."""
    frame = pd.read_csv(DATA)
    n = frame["Model Size"].to_numpy()
    d = frame["Training FLOP"].to_numpy() / (6 * n)
    loss = frame["loss"].to_numpy()
    keep = np.argsort(loss, kind="stable")[:-5]  # leave out the 5 highest losses, like Epoch
    result = fit_law(  # Chinchilla's and Epoch's Huber delta, 1e-3
        "chinchilla_dense",
        {"n": n[keep], "d": d[keep], "loss": loss[keep]},
        n_bootstrap=0,
        holdout=False,
        huber_delta=1e-3,
    )
    p = result.params
    assert p["alpha"] == pytest.approx(0.3478, abs=0.01)
    assert p["beta"] == pytest.approx(0.3658, abs=0.01)
    assert p["E"] == pytest.approx(1.8172, abs=0.02)
    assert p["A"] == pytest.approx(482.01, rel=0.05)
    assert p["B"] == pytest.approx(2085.43, rel=0.05)
    assert result.converged, result.status_detail
    assert result.n_points == 240
    # standard errors in the range Epoch reports (0.02 for the exponents)
    assert 0.0 < result.stderr["alpha"] < 0.05
    assert 0.0 < result.stderr["beta"] < 0.05


@pytest.mark.parametrize("name", sorted(LAWS))
def test_noiseless_recovery(name):
    result = fit_law(name, synthetic(name), n_bootstrap=0, holdout=False)
    assert result.status == "converged", result.status_detail
    for param, true in TRUE_PARAMS[name].items():
        assert result.params[param] == pytest.approx(true, rel=0.01), param
    assert result.rmse < 1e-8


def test_huber_resists_outliers():
    name = "chinchilla_scratch"
    clean = synthetic(name)
    outliers = [1, 10, 20]
    corrupted = dict(clean, loss=clean["loss"].copy())
    corrupted["loss"][outliers] *= 1.15
    inliers = np.setdiff1d(np.arange(clean["loss"].size), outliers)

    def inlier_error(result):
        predicted = result.predict(n=clean["n"], d=clean["d"])
        return np.max(np.abs(predicted[inliers] / clean["loss"][inliers] - 1))

    robust = fit_law(name, corrupted, n_bootstrap=0, holdout=False, huber_delta=1e-3)
    least_squares = fit_law(name, corrupted, n_bootstrap=0, holdout=False, huber_delta=10.0)
    for param, true in TRUE_PARAMS[name].items():
        assert robust.params[param] == pytest.approx(true, rel=0.05), param
    assert inlier_error(robust) < 1e-3
    assert inlier_error(least_squares) > 10 * inlier_error(robust)


def test_too_few_points_is_a_clear_error():
    data = synthetic("dataset")
    few = {k: v[:5] for k, v in data.items()}
    with pytest.raises(ValueError, match=r"'dataset'.*needs at least 6 distinct"):
        fit_law("dataset", few, n_bootstrap=0)
    nan = {k: np.full_like(v, np.nan) for k, v in data.items()}
    with pytest.raises(ValueError, match=r"'dataset': no usable data points.*at least 6"):
        fit_law("dataset", nan, n_bootstrap=0)
    # NaN entries are dropped, not fitted
    assert check_data("dataset", {**data, "loss": np.where(data["d2"] > 1e6, np.nan, data["loss"])})["loss"].size == 24
    one_d1 = {k: v[data["d1"] == data["d1"][0]] for k, v in data.items()}
    with pytest.raises(ValueError, match="distinct values of d1"):
        fit_law("dataset", one_d1, n_bootstrap=0)
    with pytest.raises(ValueError, match="lack loss"):
        fit_law("dataset", {"d1": data["d1"], "d2": data["d2"]})


def test_result_fields_held_out_and_json_round_trip(tmp_path):
    data = synthetic("dataset", noise=0.002, seed=4)
    result = fit_law("dataset", data, n_bootstrap=8, seed=3, context={"size": "xs"})
    assert result.n_points == 36 and result.n_params == 5
    assert math.isfinite(result.aic) and result.bic > result.aic
    # AICc: AIC + 2k(k+1)/(n-k-1) with k = 5 parameters + the variance
    assert result.aicc == pytest.approx(result.aic + 2 * 6 * 7 / (36 - 7))
    assert result.huber > 0 and result.rmse > 0
    assert set(result.held_out) == {"d2", "d1"}
    for entry in result.held_out.values():
        assert entry["n_points"] == 6 and entry["refit_from"] == "grid"
        assert 0 < entry["rmse"] < 0.1
    assert all(len(v) == 8 for v in result.bootstrap["samples"].values())
    assert result.predict_samples(d1=1e5, d2=1e5).shape == (8,)
    assert set(result.identification) == set(result.params)

    path = result.save(tmp_path / "fits" / "dataset.json")
    json.loads(path.read_text())  # strict JSON (no NaN)
    loaded = FitResult.load(path)
    assert loaded.params == pytest.approx(result.params)
    assert loaded.interval == result.interval
    assert loaded.status == result.status and loaded.aicc == pytest.approx(result.aicc)
    assert loaded.context == {"size": "xs"}
    assert loaded.predict(d1=2e5, d2=3e5) == pytest.approx(result.predict(d1=2e5, d2=3e5))


def test_held_out_refits_never_see_the_held_out_runs():
    """The held-out error is that of a fit, from the grid, on the other runs only."""
    data = synthetic("dataset", noise=0.003, seed=7)
    result = fit_law("dataset", data, n_bootstrap=0)
    largest = data["d2"] == data["d2"].max()
    alone = fit_law("dataset", {k: v[~largest] for k, v in data.items()}, n_bootstrap=0, holdout=False)
    predicted = alone.predict(d1=data["d1"][largest], d2=data["d2"][largest])
    rmse = np.sqrt(np.mean((predicted - data["loss"][largest]) ** 2))
    assert result.held_out["d2"]["rmse"] == pytest.approx(rmse, rel=1e-6)
    assert result.held_out["d2"]["params"] == pytest.approx(alone.params, rel=1e-6)


def test_held_out_skipped_when_too_few_points_remain():
    data = synthetic("scratch_power")
    small = {k: v[:4] for k, v in data.items()}  # 3 parameters: 4 points, 3 after holding out
    result = fit_law("scratch_power", small, n_bootstrap=0)
    assert "skipped" in result.held_out["d"]


def test_skipped_result_round_trip(tmp_path):
    skipped = FitResult.skipped("joint", "needs 3 sizes", {"moe": "e4k2g1"})
    assert not skipped.ok
    with pytest.raises(ValueError, match="not fitted"):
        skipped.predict(d1=1.0, d2=1.0, n1=1.0)
    loaded = FitResult.load(skipped.save(tmp_path / "joint.json"))
    assert loaded.status == "skipped" and loaded.reason == "needs 3 sizes"
    assert math.isnan(loaded.rmse)


def test_standard_errors_hold_pinned_parameters_fixed():
    law = LAWS["scratch_power"]
    data = synthetic("scratch_power", noise=0.002, seed=1)
    log_d = np.log(data["d"])
    design = law.design({"d": log_d - log_d.mean()})
    theta = np.array([0.0, 0.3, law.params[2].bounds[0]])  # log_E pinned at its lower bound
    residuals = law.log_predict(theta, {"d": log_d - log_d.mean()}) - np.log(data["loss"])
    errors = diagnostics.standard_errors(
        law,
        diagnostics.log_jacobian(design, theta),
        residuals,
        theta,
        law.unscale_matrix({"d": log_d.mean()}),
        np.array([False, False, True]),
    )
    assert math.isnan(errors.errors["E"]) and "E" in errors.note
    assert math.isfinite(errors.errors["B"]) and math.isfinite(errors.errors["beta"])
    assert not errors.singular


def test_information_criteria():
    residuals = np.array([0.01, -0.02, 0.015, 0.0, -0.005, 0.01, -0.01, 0.02])
    n, k = residuals.size, 3 + 1
    log_likelihood = -0.5 * n * (math.log(2 * math.pi * np.mean(residuals**2)) + 1)
    criteria = diagnostics.information_criteria(residuals, 3)
    assert criteria["aic"] == pytest.approx(2 * k - 2 * log_likelihood)
    assert criteria["aicc"] == pytest.approx(criteria["aic"] + 2 * k * (k + 1) / (n - k - 1))
    assert criteria["bic"] == pytest.approx(k * math.log(n) - 2 * log_likelihood)
    assert math.isinf(diagnostics.information_criteria(residuals[:5], 3)["aicc"])


def test_identification_with_every_parameter_at_a_bound_reports_each_not_identified(monkeypatch):
    """A degenerate fit (every parameter on a bound) is reported, not a crash of the fit stage."""
    captured = []
    original = diagnostics.identification
    monkeypatch.setattr(
        diagnostics, "identification", lambda *args, **kwargs: captured.append(args) or original(*args, **kwargs)
    )
    fit_law("dataset", synthetic("dataset", noise=0.01, seed=1), n_bootstrap=0, n_starts=3, holdout=False)
    law, theta, _, unscale, _, _, arrays, log_ref, log_residuals = captured[0]
    design = law.design({v: np.log(arrays[v]) - log_ref[v] for v in law.variables})
    every = np.ones(law.n_params, dtype=bool)
    errors = diagnostics.standard_errors(
        law, diagnostics.log_jacobian(design, theta), log_residuals, theta, unscale, every
    )
    result = original(
        law,
        theta,
        np.empty((0, law.n_params)),
        unscale,
        errors,
        {spec.natural: "forced" for spec in law.params},
        arrays,
        log_ref,
        log_residuals,
    )
    assert set(result) == {spec.natural for spec in law.params}
    assert not any(entry["identified"] for entry in result.values())
    assert all("on a bound" in entry["extension_note"] for entry in result.values())
