"""Break-even D2 between upcycling and training the MoE from scratch."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from upcycling.analysis import guidance
from upcycling.analysis.guidance import (
    break_even_d2,
    closed_form_break_even_d2,
    equal_compute_curves,
    guidance_table,
    scratch_loss_fn,
    scratch_tokens,
    upcycled_loss_fn,
)

N1, N2 = 3.0e5, 1.0e6
UPCYCLED = SimpleNamespace(law="dataset", params=dict(A=50.0, alpha1=0.3, alpha2=0.4, alpha3=0.02, E=2.0))


def scratch_with_same_constant(upcycled_constant, beta=0.35, B=200.0):
    """A from-scratch Chinchilla law whose loss at N2 and infinite data equals the upcycled E."""
    E, alpha = 1.5, 0.3
    A = (upcycled_constant - E) * N2**alpha
    return SimpleNamespace(law="chinchilla_scratch", params=dict(E=E, A=A, alpha=alpha, B=B, beta=beta))


def numeric(upcycled, scratch, d1, count_sunk_cost=False, **kwargs):
    return break_even_d2(
        upcycled_loss_fn(upcycled, N1),
        scratch_loss_fn(scratch, N2),
        d1,
        n1=N1,
        n2=N2,
        count_sunk_cost=count_sunk_cost,
        **kwargs,
    )


@pytest.mark.parametrize("d1", [1e5, 1e6, 1e7, 1e8])
def test_numeric_matches_closed_form_same_irreducible_loss(d1):
    scratch = scratch_with_same_constant(UPCYCLED.params["E"])
    closed = closed_form_break_even_d2(UPCYCLED, scratch, d1, n2=N2)
    found = numeric(UPCYCLED, scratch, d1)
    assert found.status == "crossing"
    assert found.d2_star == pytest.approx(closed, rel=1e-9)
    # at D2* the two losses are equal
    up = upcycled_loss_fn(UPCYCLED)(d1, found.d2_star)
    assert up == pytest.approx(scratch_loss_fn(scratch, N2)(found.d2_star), rel=1e-12)


def test_numeric_matches_closed_form_for_joint_law():
    joint = SimpleNamespace(
        law="joint", params=dict(A=50.0, alpha1=0.3, alpha2=0.4, alpha3=0.02, B=300.0, beta2=0.35, E=1.7)
    )
    constant = joint.params["E"] + joint.params["B"] * N1 ** -joint.params["beta2"]
    scratch = scratch_with_same_constant(constant)
    for d1 in (1e5, 1e7):
        closed = closed_form_break_even_d2(joint, scratch, d1, n1=N1, n2=N2)
        found = numeric(joint, scratch, d1)
        assert found.d2_star == pytest.approx(closed, rel=1e-9)


def test_numeric_matches_closed_form_same_exponent():
    """gamma = alpha2 - alpha3 ln D1 equal to the scratch beta, different constants."""
    d1 = 1e6
    gamma = UPCYCLED.params["alpha2"] - UPCYCLED.params["alpha3"] * math.log(d1)
    scratch = SimpleNamespace(law="scratch_power", params=dict(E=1.5, B=5.0, beta=gamma))
    closed = closed_form_break_even_d2(UPCYCLED, scratch, d1)
    found = break_even_d2(upcycled_loss_fn(UPCYCLED), scratch_loss_fn(scratch), d1, n1=N1, n2=N2, count_sunk_cost=False)
    assert found.status == "crossing"
    assert found.d2_star == pytest.approx(closed, rel=1e-9)


def test_no_closed_form_cases():
    scratch = SimpleNamespace(law="chinchilla_scratch", params=dict(E=1.0, A=300.0, alpha=0.3, B=200.0, beta=0.35))
    assert closed_form_break_even_d2(UPCYCLED, scratch, 1e6, n2=N2) is None
    same = scratch_with_same_constant(UPCYCLED.params["E"])
    assert closed_form_break_even_d2(UPCYCLED, same, 1e6, n2=N2, count_sunk_cost=True) is None


def test_counting_the_sunk_cost_favours_scratch():
    scratch = scratch_with_same_constant(UPCYCLED.params["E"])
    for d1 in (1e5, 1e6, 1e7):
        not_counted = numeric(UPCYCLED, scratch, d1, count_sunk_cost=False)
        counted = numeric(UPCYCLED, scratch, d1, count_sunk_cost=True)
        assert counted.d2_star <= not_counted.d2_star
        if counted.status == "crossing":
            d2 = counted.d2_star
            d_s = d2 + N1 * d1 / N2
            up = upcycled_loss_fn(UPCYCLED)(d1, d2)
            assert up == pytest.approx(scratch_loss_fn(scratch, N2)(d_s), rel=1e-12)


def test_range_conventions():
    # upcycling always better: a scratch law with a much higher floor
    worse = SimpleNamespace(law="scratch_power", params=dict(E=5.0, B=200.0, beta=0.35))
    result = break_even_d2(upcycled_loss_fn(UPCYCLED), scratch_loss_fn(worse), 1e6, n1=N1, n2=N2, count_sunk_cost=False)
    assert result.status == "upcycle_better_in_range" and math.isinf(result.d2_star)
    # scratch always better: a much lower floor and a tiny data term
    better = SimpleNamespace(law="scratch_power", params=dict(E=0.5, B=1.0, beta=0.35))
    result = break_even_d2(
        upcycled_loss_fn(UPCYCLED), scratch_loss_fn(better), 1e6, n1=N1, n2=N2, count_sunk_cost=False
    )
    assert result.status == "scratch_better_in_range" and result.d2_star == 0.0
    # a crossing beyond the searched range is reported as none in range
    scratch = scratch_with_same_constant(UPCYCLED.params["E"])
    closed = closed_form_break_even_d2(UPCYCLED, scratch, 1e6, n2=N2)
    short = numeric(UPCYCLED, scratch, 1e6, d2_range=(1e3, closed / 10))
    assert math.isinf(short.d2_star)
    with pytest.raises(ValueError):
        numeric(UPCYCLED, scratch, 1e6, d2_range=(10.0, 1.0))


def test_scratch_tokens_and_equal_compute():
    d1, d2 = 2e5, 5e5
    assert scratch_tokens(d1, d2, N1, N2, False) == pytest.approx(d2)
    d_s = scratch_tokens(d1, d2, N1, N2, True)
    assert 6 * N2 * d_s == pytest.approx(6 * N2 * d2 + 6 * N1 * d1)
    scratch = scratch_with_same_constant(UPCYCLED.params["E"])
    curves = equal_compute_curves(UPCYCLED, scratch, d1, [d2, 2 * d2], n1=N1, n2=N2, count_sunk_cost=True)
    np.testing.assert_allclose(curves["compute"], 6 * N2 * curves["scratch_tokens"])
    np.testing.assert_allclose(curves["upcycled_loss"], upcycled_loss_fn(UPCYCLED)(d1, np.array([d2, 2 * d2])))


def test_guidance_table():
    scratch = scratch_with_same_constant(UPCYCLED.params["E"])
    rows = guidance_table(UPCYCLED, scratch, [1e5, 1e6, 1e7], n1=N1, n2=N2)
    assert len(rows) == 6
    assert {row["count_sunk_cost"] for row in rows} == {False, True}
    for row in rows:
        gamma = UPCYCLED.params["alpha2"] - UPCYCLED.params["alpha3"] * math.log(row["d1"])
        assert row["effective_d2_exponent"] == pytest.approx(gamma)
        if not row["count_sunk_cost"]:
            assert row["d2_star"] == pytest.approx(row["closed_form_d2_star"], rel=1e-9)
        else:
            assert row["closed_form_d2_star"] is None


def test_loss_functions_validate_laws():
    with pytest.raises(ValueError, match="not an upcycled"):
        upcycled_loss_fn(SimpleNamespace(law="chinchilla_dense", params={}))
    with pytest.raises(ValueError, match="needs the dense model size"):
        upcycled_loss_fn(SimpleNamespace(law="joint", params={}))
    with pytest.raises(ValueError, match="not a from-scratch"):
        scratch_loss_fn(UPCYCLED)
    with pytest.raises(ValueError, match="needs the active parameters"):
        scratch_loss_fn(SimpleNamespace(law="chinchilla_scratch", params={}))
    assert guidance.DEFAULT_D2_RANGE[0] < guidance.DEFAULT_D2_RANGE[1]


def test_crossings_finds_every_change_of_the_better_option():
    """With the dense cost counted, from scratch gets N1 D1 / N2 extra tokens: ahead at small
    D2, behind in between, ahead again at large D2 when it learns faster: two crossings."""

    def up(d1, d2):
        return 2.0 + 5.0 * np.asarray(d2, dtype=float) ** -0.2

    def sc(d):
        return 1.8 + 300.0 * np.asarray(d, dtype=float) ** -0.5

    d1 = 1e4 * N2 / N1  # the dense cost buys the from-scratch run 1e4 tokens
    found = guidance.crossings(up, sc, d1, n1=N1, n2=N2, count_sunk_cost=True, d2_range=(1.0, 1e9))
    assert [c["better_after"] for c in found] == ["upcycle", "scratch"]
    for crossing in found:
        d2 = crossing["d2"]
        assert up(d1, d2) == pytest.approx(sc(scratch_tokens(d1, d2, N1, N2, True)), rel=1e-10)
    last = break_even_d2(up, sc, d1, n1=N1, n2=N2, count_sunk_cost=True, d2_range=(1.0, 1e9))
    assert found[-1]["d2"] == pytest.approx(last.d2_star, rel=1e-9)
    # without the dense cost only the last crossing remains
    alone = guidance.crossings(up, sc, d1, n1=N1, n2=N2, count_sunk_cost=False, d2_range=(1e2, 1e9))
    assert [c["better_after"] for c in alone] == ["scratch"]


def test_break_even_samples_match_the_exact_root_per_sample():
    scratch = scratch_with_same_constant(UPCYCLED.params["E"])
    rng = np.random.default_rng(0)
    up_samples = {k: list(v * np.exp(rng.normal(0, 0.02, 6))) for k, v in UPCYCLED.params.items()}
    scratch_samples = {k: list(v * np.exp(rng.normal(0, 0.02, 6))) for k, v in scratch.params.items()}
    up_fit = SimpleNamespace(law="dataset", params=UPCYCLED.params, bootstrap={"samples": up_samples})
    scratch_fit = SimpleNamespace(
        law="chinchilla_scratch", params=scratch.params, bootstrap={"samples": scratch_samples}
    )
    d2_range = guidance.search_range([1e4, 1e9], decades=1.0)
    assert d2_range == pytest.approx((1e3, 1e10))
    for counted in (False, True):
        samples = guidance.break_even_samples(
            up_fit, scratch_fit, 1e6, n1=N1, n2=N2, count_sunk_cost=counted, d2_range=d2_range
        )
        assert samples.shape == (6,)
        for i, value in enumerate(samples):
            one_up = SimpleNamespace(law="dataset", params={k: v[i] for k, v in up_samples.items()})
            one_scratch = SimpleNamespace(
                law="chinchilla_scratch", params={k: v[i] for k, v in scratch_samples.items()}
            )
            exact = numeric(one_up, one_scratch, 1e6, count_sunk_cost=counted, d2_range=d2_range)
            if math.isfinite(exact.d2_star) and exact.d2_star > 0:
                assert value == pytest.approx(exact.d2_star, rel=2e-3)  # linear interpolation
            else:
                assert value == exact.d2_star
    empty = SimpleNamespace(law="dataset", params=UPCYCLED.params, bootstrap={})
    assert guidance.break_even_samples(empty, scratch_fit, 1e6, n1=N1, n2=N2, count_sunk_cost=False).size == 0
