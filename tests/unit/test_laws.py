"""The scaling-law functions, their log-space design and the registry."""

import math

import numpy as np
import pytest

from upcycling.analysis import laws
from upcycling.analysis.laws import LAWS, get_law

# physically sensible natural-unit coefficients for every registered law
TRUE_PARAMS = {
    "dataset": dict(A=50.0, alpha1=0.3, alpha2=0.4, alpha3=0.015, E=2.0),
    "dataset_no_interaction": dict(A=30.0, alpha1=0.1, alpha2=0.25, E=2.0),
    "dataset_additive": dict(A=40.0, alpha1=0.3, B=60.0, alpha2=0.35, E=2.0),
    "model_config": dict(A=0.8, beta1=0.4, F=300.0, beta2=0.35, E=2.0),
    "joint": dict(A=50.0, alpha1=0.3, alpha2=0.4, alpha3=0.015, B=200.0, beta2=0.3, E=1.5),
    "joint_no_interaction": dict(A=30.0, alpha1=0.1, alpha2=0.25, B=200.0, beta2=0.3, E=1.5),
    "chinchilla_dense": dict(E=1.8, A=400.0, alpha=0.34, B=2000.0, beta=0.36),
    "chinchilla_scratch": dict(E=1.8, A=400.0, alpha=0.34, B=2000.0, beta=0.36),
    "scratch_power": dict(B=60.0, beta=0.3, E=2.5),
}

# columns of upcycling.analysis.fitstage.runs_table
TABLE_COLUMNS = {
    "size",
    "init",
    "method",
    "seed",
    "d1_tokens",
    "d2_tokens",
    "experts",
    "top_k",
    "granularity",
    "final_val_loss",
    "flops",
    "n_params",
    "active_params",
    "dense_params",
    "non_embedding_params",
    "active_non_embedding_params",
    "dense_non_embedding_params",
    "tokens_seen",
    "wall_time_s",
    "n1_params",
    "n2_params",
    "total_params",
    "sparsity",
}


def random_variables(law, rng, n=9):
    return {v: np.exp(rng.uniform(10, 16, size=n)) for v in law.variables}


def test_every_law_has_true_params():
    assert set(TRUE_PARAMS) == set(LAWS)


@pytest.mark.parametrize("name", sorted(LAWS))
def test_log_design_matches_natural_function(name):
    law = LAWS[name]
    variables = random_variables(law, np.random.default_rng(1))
    expected = np.log(law.predict(TRUE_PARAMS[name], **variables))
    theta = law.from_natural(TRUE_PARAMS[name])
    log_vars = {v: np.log(x) for v, x in variables.items()}
    np.testing.assert_allclose(law.log_predict(theta, log_vars), expected, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(LAWS))
def test_unscale_maps_scaled_fit_to_natural_units(name):
    """A fit on v / ref, mapped by unscale, predicts the same losses on v."""
    law = LAWS[name]
    rng = np.random.default_rng(2)
    log_ref = {v: rng.uniform(10, 20) for v in law.variables}
    theta_scaled = np.array([rng.uniform(-1, 1) if p.is_log_amplitude else rng.uniform(0.1, 0.5) for p in law.params])
    variables = random_variables(law, rng)
    scaled_logs = {v: np.log(x) - log_ref[v] for v, x in variables.items()}
    natural = law.to_natural(law.unscale(theta_scaled, log_ref))
    np.testing.assert_allclose(
        np.log(law.predict(natural, **variables)), law.log_predict(theta_scaled, scaled_logs), rtol=1e-10
    )
    np.testing.assert_allclose(law.scale(law.unscale(theta_scaled, log_ref), log_ref), theta_scaled, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LAWS))
def test_natural_round_trip(name):
    law = LAWS[name]
    params = TRUE_PARAMS[name]
    assert law.to_natural(law.from_natural(params)) == pytest.approx(params, rel=1e-12)


@pytest.mark.parametrize("name", sorted(LAWS))
def test_registry_is_consistent(name):
    law = LAWS[name]
    assert set(law.fields) == set(law.variables)
    assert set(law.fields.values()) <= TABLE_COLUMNS
    assert set(law.holdout) <= set(law.variables)
    assert set(law.min_distinct) <= set(law.variables)
    assert all(b in LAWS for b in law.baselines)
    for spec in law.params:
        low, high = spec.bounds
        assert low < high
        assert all(low < value < high for value in spec.grid), spec


@pytest.mark.parametrize("name", sorted(LAWS))
def test_bounds_leave_every_sign_free_except_the_prior(name):
    """Only amplitudes and E are positive (fitted as logs); no exponent's sign is bounded,
    unless the "more data never hurts" prior is asked for."""
    law = LAWS[name]
    free, prior = law.bounds(), law.bounds(monotone=True)
    for spec, (low, high), (prior_low, _) in zip(law.params, free, prior):
        if spec.is_log_amplitude:
            assert low <= -30 and prior_low == low, spec  # e^-30: the term is absent
        else:
            assert low < 0 < high, spec
            assert prior_low == (0.0 if spec.monotone else low), spec
    assert not any(spec.monotone for spec in law.params if spec.name == "alpha3")
    terms = law.amplitude_terms()
    assert set(terms) == {spec.name for spec in law.params if spec.is_log_amplitude}
    assert len(set(terms.values())) == len(terms)  # one amplitude per term


def test_law_formulas():
    d1, d2, n1 = 2.0e5, 8.0e5, 3.0e6
    A, a1, a2, a3, E, B, b2 = 50.0, 0.3, 0.4, 0.015, 2.0, 200.0, 0.3
    dataset = A * d1**-a1 * d2 ** (-a2 + a3 * math.log(d1)) + E
    assert laws.dataset(d1, d2, A, a1, a2, a3, E) == pytest.approx(dataset, rel=1e-14)
    assert laws.dataset_no_interaction(d1, d2, A, a1, a2, E) == pytest.approx(A * d1**-a1 * d2**-a2 + E, rel=1e-14)
    assert laws.dataset_additive(d1, d2, A, a1, B, a2, E) == pytest.approx(A * d1**-a1 + B * d2**-a2 + E, rel=1e-14)
    assert laws.joint(d1, d2, n1, A, a1, a2, a3, B, b2, E) == pytest.approx(dataset + B * n1**-b2, rel=1e-14)
    assert laws.model_config(4.0, n1, 0.8, 0.4, 300.0, 0.35, 2.0) == pytest.approx(
        0.8 * 4.0**-0.4 + 300.0 * n1**-0.35 + 2.0, rel=1e-14
    )
    assert laws.chinchilla(1e9, 2e10, 1.8, 400.0, 0.34, 2000.0, 0.36) == pytest.approx(
        1.8 + 400.0 / 1e9**0.34 + 2000.0 / 2e10**0.36, rel=1e-14
    )
    assert laws.data_power(2e10, 2000.0, 0.36, 1.8) == pytest.approx(1.8 + 2000.0 / 2e10**0.36, rel=1e-14)


def test_log_predict_is_stable_for_extreme_terms():
    law = LAWS["chinchilla_dense"]
    theta = np.array([math.log(1.8), 800.0, 0.0, -800.0, 0.0])  # exp(800) overflows
    out = law.log_predict(theta, {"n": np.array([1.0]), "d": np.array([1.0])})
    assert out == pytest.approx([800.0])


def test_get_law():
    assert get_law("dataset") is LAWS["dataset"]
    assert get_law(LAWS["joint"]) is LAWS["joint"]
    with pytest.raises(KeyError, match="unknown law"):
        get_law("nope")
