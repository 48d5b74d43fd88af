"""Bound-aware intervals, the identified rule, the token unit, the two-step cross-check and the
shared-E option of the fits (docs/fits.md; the coverage study: benchmarks/coverage_study.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from upcycling.analysis import laws
from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitstage import _shared_irreducible
from upcycling.analysis.fitting import fit_law
from upcycling.analysis.intervals import TOKEN_UNITS, params_in_unit
from upcycling.analysis.twostep import two_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import coverage_study as study

QUICK = dict(n_bootstrap=0, holdout=False, n_starts=4, huber_delta=1e-2)


def paper_grid(truth, noise, seed):
    d1, d2 = (a.ravel() for a in np.meshgrid(study.D1, study.D2, indexing="ij"))
    rng = np.random.default_rng(seed)
    return {"d1": d1, "d2": d2, "loss": laws.dataset(d1, d2, **truth) * np.exp(rng.normal(0.0, noise, d1.size))}


@pytest.fixture(scope="module")
def well_posed():
    truth = study.TRUTHS["strong"]
    return truth, fit_law("dataset", paper_grid(truth, 0.003, 1), **QUICK)


def test_e_on_its_bound_gets_a_wide_interval_that_covers_the_truth():
    """The issue's case: E = 2, but the fit ends with E -> 0. E is not identified and its interval
    reaches from 0 past the truth; alpha3's interval, with E free over [0, inf), covers the truth."""
    truth = study.TRUTHS["paper"]
    fit = fit_law("dataset", paper_grid(truth, 0.01, 4), **QUICK)
    assert fit.status == "at_bound" and "E" in fit.at_bound
    assert not fit.identification["E"]["identified"]
    assert fit.identification["E"]["separable"] is False
    low, high = fit.interval["E"]
    assert low == 0.0 and high > truth["E"]
    low, high = fit.interval["alpha3"]
    assert low <= truth["alpha3"] <= high
    assert fit.interval_method["threshold"] > 3.84  # t_{n-p}^2, above chi^2_1
    # on a bound the likelihood is not regular: nothing is labelled identified (docs/fits.md)
    assert not any(entry["identified"] for entry in fit.identification.values())
    assert not fit.invariants["alpha3"]["identified"] and "bound" in fit.invariants["alpha3"]["why"]


def test_well_posed_fit_keeps_narrow_identified_intervals_covering_the_truth(well_posed):
    truth, fit = well_posed
    assert fit.status == "converged"
    for name in ("alpha1", "alpha2", "alpha3", "E"):
        low, high = fit.interval[name]
        assert fit.identification[name]["identified"], (name, fit.identification[name])
        assert low <= truth[name] <= high, name
    low, high = fit.interval["E"]
    assert high / low < 1.2  # narrow


def test_an_unbounded_side_is_not_identified_and_survives_json(tmp_path, well_posed):
    _, fit = well_posed
    open_fit = FitResult.from_dict({**fit.to_dict(), "interval": {**fit.interval, "alpha3": [0.01, math.inf]}})
    loaded = FitResult.load(open_fit.save(tmp_path / "fit.json"))
    assert loaded.interval["alpha3"] == [0.01, math.inf]
    from upcycling.analysis.identify import identified

    ok, why = identified(None, 0.02, [0.01, math.inf], None)
    assert not ok and "unbounded above" in why


def test_token_unit_conversion_matches_predictions_on_rescaled_data(well_posed):
    _, fit = well_posed
    d1, d2 = np.array([1.5e10, 8e10, 3e11]), np.array([7e9, 2e10, 2e11])
    for unit, per in TOKEN_UNITS.items():
        converted = params_in_unit(fit.params, unit)
        assert laws.dataset(d1 / per, d2 / per, **converted) == pytest.approx(
            laws.dataset(d1, d2, **fit.params), rel=1e-9
        )
    assert fit.token_unit == "billions"
    in_unit = params_in_unit(fit.params, "billions")
    assert fit.in_unit["alpha1"]["value"] == pytest.approx(in_unit["alpha1"], abs=1e-9)
    assert fit.in_unit["alpha2"]["value"] == pytest.approx(in_unit["alpha2"], abs=1e-9)
    invariant = fit.invariants["alpha2_minus_alpha1"]
    assert invariant["value"] == pytest.approx(in_unit["alpha2"] - in_unit["alpha1"], abs=1e-9)
    assert invariant["value"] == pytest.approx(fit.params["alpha2"] - fit.params["alpha1"], abs=1e-9)
    assert invariant["interval"][0] < invariant["value"] < invariant["interval"][1]
    assert fit.invariants["alpha3"]["interval"] == fit.interval["alpha3"]


def test_two_step_slope_recovers_alpha3():
    truth = study.TRUTHS["strong"]
    exact = paper_grid(truth, 0.0, 0)
    result = two_step(exact["d1"], exact["d2"], exact["loss"], huber_delta=1e-2)
    assert result["slope"]["value"] == pytest.approx(truth["alpha3"], rel=1e-3)
    for entry in result["per_d1"]:  # the D2 exponent at each D1: alpha2 - alpha3 ln D1
        assert entry["exponent"] == pytest.approx(truth["alpha2"] - truth["alpha3"] * math.log(entry["d1"]), rel=1e-4)
    noisy = paper_grid(truth, 0.002, 3)
    result = two_step(noisy["d1"], noisy["d2"], noisy["loss"], huber_delta=1e-2, joint_alpha3={"value": 0.0})
    low, high = result["slope"]["interval"]
    assert low <= truth["alpha3"] <= high and result["joint_alpha3"] == {"value": 0.0}


def test_shared_e_is_held_and_recorded():
    truth = study.TRUTHS["strong"]
    data = paper_grid(truth, 0.003, 2)
    dense = FitResult(law="chinchilla_dense", formula="", variables={}, params={"E": 1.9}, status="converged")
    options, context = _shared_irreducible(dense)
    assert context["irreducible"] == "shared_dense" and context["irreducible_E"] == 1.9
    fit = fit_law("dataset", data, context=context, **QUICK, **options)
    assert fit.params["E"] == pytest.approx(1.9, rel=1e-8)
    assert fit.held["E"]["value"] == 1.9 and "chinchilla_dense" in fit.held["E"]["why"]
    assert fit.to_dict()["context"]["irreducible"] == "shared_dense"
    assert fit.identification["E"]["held"] and "E" not in fit.at_bound
    options, context = _shared_irreducible(FitResult.skipped("chinchilla_dense", "no dense runs"))
    assert options == {} and context["irreducible"] == "free" and "shared_dense" in context["irreducible_note"]
