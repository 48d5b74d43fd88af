"""Drop-Upcycling's re-initialisation ratio r in the fits (upcycling.analysis.fitset, fitstage):
a key carries r > 0 and reads back to itself while r = 0 keeps today's names, every r's
upcycled fit is compared with the one from-scratch fit of its architecture, the dataset and
joint laws are planned per r and the model-configuration law on r = 0, and a store aggregated
before r existed fits as it did."""

from __future__ import annotations

import math
import re

import pytest

import synthetic_study as study
from upcycling.analysis import fitstage
from upcycling.analysis import store as results
from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import FitKey, FitSet, MoeVariant
from upcycling.core.errors import InputError

CONFIG = "tokenizer:\n  vocab_size: 2048\n"


def _table(**study_options):
    return fitstage.runs_table(results.build_dataset(study.records(**study_options), CONFIG, "synthetic"))


def _fit(key: str, sizes=("s",)) -> FitResult:
    context = {"key": key, "sizes": {size: {"n1": 1e5, "n2": 2e5, "n_total": 4e5} for size in sizes}}
    return FitResult(law=key.split(".")[0], formula="", variables={}, params={"E": 2.0}, context=context)


@pytest.mark.parametrize(
    ("text", "variant"),
    [
        ("dataset.moe_upcycle.s.e4k2g1", MoeVariant(4, 2, 1)),  # r = 0: today's name
        ("dataset.moe_upcycle.s.e4k2g1r0.5", MoeVariant(4, 2, 1, 0.5)),
        ("joint.moe_upcycle.e8k2g2r0.25", MoeVariant(8, 2, 2, 0.25)),
        ("chinchilla_scratch.moe_upcycle.e4k2g1r1", MoeVariant(4, 2, 1, 1.0)),
    ],
)
def test_a_key_with_a_ratio_reads_back_to_itself(text, variant):
    key = FitKey.parse(text)
    assert key.moe == variant
    assert str(key) == text
    assert str(MoeVariant(4, 2, 1, 0.0)) == "e4k2g1"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("dataset.moe_upcycle.s.e4k2g1r0", "write it 'e4k2g1'"),  # one name per fit
        ("dataset.moe_upcycle.s.e4k2g1r0.50", "write it 'e4k2g1r0.5'"),
        ("dataset.moe_upcycle.s.e4k2g1rx", "r<reinit_ratio>"),
        ("model_config.moe_upcycle.e4k2g1r0.5", "model_config.<method>"),
    ],
)
def test_a_misspelt_ratio_is_refused_naming_the_spelling(text, named):
    with pytest.raises(InputError, match=re.escape(named)):
        FitKey.parse(text)


def test_every_ratio_pairs_with_the_from_scratch_fit_of_its_architecture():
    fits = FitSet.of(
        {
            fit.key: fit
            for fit in (
                _fit("dataset.moe_upcycle.s.e4k2g1"),
                _fit("dataset.moe_upcycle.s.e4k2g1r0.5"),
                _fit("joint.moe_upcycle.e4k2g1r0.5", sizes=("s", "xs")),
                _fit("scratch_power.moe_upcycle.s.e4k2g1"),
                _fit("chinchilla_scratch.moe_upcycle.e4k2g1", sizes=("s", "xs")),
            )
        }
    )
    pairs = {(str(pair.upcycled_key), pair.size): str(pair.scratch_key) for pair in fits.upcycled_pairs()}
    assert pairs == {
        ("dataset.moe_upcycle.s.e4k2g1", "s"): "scratch_power.moe_upcycle.s.e4k2g1",
        ("dataset.moe_upcycle.s.e4k2g1r0.5", "s"): "scratch_power.moe_upcycle.s.e4k2g1",
        ("joint.moe_upcycle.e4k2g1r0.5", "s"): "chinchilla_scratch.moe_upcycle.e4k2g1",
        ("joint.moe_upcycle.e4k2g1r0.5", "xs"): "chinchilla_scratch.moe_upcycle.e4k2g1",
    }


def test_the_dataset_and_joint_laws_are_planned_per_ratio_and_model_config_on_r0():
    table = _table(reinit_alpha3=study.REINIT_ALPHA3)
    upcycled = table[(table["init"] == "upcycled") & (table["experts"] == 4)]
    assert sorted(upcycled["reinit_ratio"].unique()) == [0.0, 0.5]
    assert set(table.loc[table["init"] != "upcycled", "reinit_ratio"]) == {0.0}
    tasks = {str(task.key): task for task in fitstage.plan_fits(table)}
    for ratio, suffix in ((0.0, ""), (0.5, "r0.5")):
        for key in (f"dataset.moe_upcycle.xs.e4k2g1{suffix}", f"joint.moe_upcycle.e4k2g1{suffix}"):
            rows = tasks[key].rows
            assert set(rows["reinit_ratio"]) == {ratio}, key
            assert len(rows) == (1 if key.startswith("dataset") else 3) * len(study.D1) * len(study.D2), key
        assert tasks[f"joint.moe_upcycle.e4k2g1{suffix}"].context["reinit_ratio"] == ratio
    assert set(tasks["model_config.moe_upcycle"].rows["reinit_ratio"]) == {0.0}
    # from-scratch fits exist once per architecture: no r in their keys
    assert not [key for key in tasks if key.startswith(("scratch_power", "chinchilla_scratch")) and "r0" in key]
    # the r = 0 fits keep the names (and runs) of a sweep without r
    plain = {str(task.key): len(task.rows) for task in fitstage.plan_fits(_table())}
    assert {key: len(task.rows) for key, task in tasks.items() if "r0.5" not in key} == plain


def test_a_store_without_the_ratio_coordinate_fits_as_before(tmp_path):
    ds = results.build_dataset(study.records(), CONFIG, "synthetic")
    old = ds.squeeze("reinit_ratio", drop=True).drop_vars(list(results.EXPERT_SUMMARIES))
    results.write_store(old, tmp_path / "old.zarr")
    reopened = results.load_losses(tmp_path / "old.zarr")
    assert "reinit_ratio" not in reopened.coords
    table = fitstage.runs_table(reopened)
    assert set(table["reinit_ratio"]) == {0.0}
    planned = [str(task.key) for task in fitstage.plan_fits(table)]
    assert planned == [str(task.key) for task in fitstage.plan_fits(fitstage.runs_table(ds))]
    assert "dataset.moe_upcycle.xs.e4k2g1" in planned


def test_the_joint_law_is_compared_per_ratio_beside_the_dataset_law():
    """Each r's joint law gets its own side-by-side table: alpha3 and the effective D2 exponent
    with their intervals, and D2* per size and D1, in the comparison, its finding and the report."""
    from upcycling.analysis import reinit, report

    sizes = {"xs": {"n1": 1e5, "n2": 2e5, "n_total": 4e5}, "s": {"n1": 4e5, "n2": 8e5, "n_total": 1.6e6}}
    d1_values = [1e5, 2e5]

    def joint(ratio: float, alpha3: float) -> FitResult:
        key = str(FitKey("joint", "moe_upcycle", moe=MoeVariant(4, 2, 1, ratio)))
        return FitResult(
            law="joint",
            formula="",
            variables={},
            params={"A": 1.0, "alpha1": 0.1, "alpha2": 0.3, "alpha3": alpha3, "B": 1.0, "beta2": 0.2, "E": 2.0},
            interval={"alpha3": [alpha3 - 0.01, alpha3 + 0.01]},
            bootstrap={"samples": {"alpha2": [0.29, 0.3, 0.31], "alpha3": [alpha3] * 3}},
            context={"key": key, "sizes": sizes, "d1_values": d1_values},
        )

    fits = FitSet.of({fit.key: fit for fit in (joint(0.0, 0.02), joint(0.5, 0.05))})
    guidance = [
        {
            "upcycled_fit": "joint.moe_upcycle.e4k2g1r0.5",
            "size": "s",
            "d1": 2e5,
            "count_sunk_cost": False,
            "d2_star": 3.0e6,
            "d2_star_interval": [2.0e6, 4.0e6],
            "conclusive": True,
        }
    ]
    (compared,) = reinit.comparisons(fits, guidance)
    assert compared.group.law == "joint" and compared.group.size is None
    assert compared.group.title == "moe_upcycle, joint law across sizes, e4k2g1"
    rows = dict(compared.rows)
    assert rows["alpha3 (95% profile interval)"] == ("0.02 [0.01, 0.03]", "0.05 [0.04, 0.06]")
    gamma = [0.3 - alpha3 * math.log(2e5) for alpha3 in (0.02, 0.05)]
    assert compared.data["0.5"]["effective_d2_exponent"] == pytest.approx(gamma[1])
    assert rows["alpha2 - alpha3 ln D1 at the largest D1 (2e+05; 95% bootstrap)"][1].startswith(f"{gamma[1]:.3g} [")
    labels = [label for label, _ in compared.rows if label.startswith("D2*")]
    assert labels == [
        f"D2* at size {size}, D1 = {d1:.3g} ({how})"
        for size in ("xs", "s")  # smallest N1 first
        for d1 in d1_values
        for how in ("dense cost sunk", "dense cost counted")
    ]
    assert rows["D2* at size s, D1 = 2e+05 (dense cost sunk)"] == ("n/a", "3e+06 [2e+06, 4e+06]")
    assert compared.data["0.5"]["d2_star"] == [
        {
            "size": "s",
            "d1": 2e5,
            "count_sunk_cost": False,
            "d2_star": 3.0e6,
            "interval": [2.0e6, 4.0e6],
            "conclusive": True,
        }
    ]
    (finding,) = reinit.ratio_findings([compared])
    assert finding["subject"] == "joint.moe_upcycle.e4k2g1" and finding["data"]["law"] == "joint"
    assert (
        "(joint law; alpha3: 95% profile interval, effective exponent: 95% bootstrap): r = 0: alpha3 = 0.02 [0.01, 0.03]"
        in finding["sentence"]
    )
    lines = report._reinit_lines([compared])
    table = lines[lines.index("#### moe_upcycle, joint law across sizes, e4k2g1") + 2 :]
    assert table[0] == "| quantity | r = 0 | r = 0.5 |"
    assert "| alpha3 (95% profile interval) | 0.02 [0.01, 0.03] | 0.05 [0.04, 0.06] |" in table
    assert "| D2* at size s, D1 = 2e+05 (dense cost sunk) | n/a | 3e+06 [2e+06, 4e+06] |" in table


def test_a_joint_law_fitted_at_no_ratio_is_left_out_of_the_comparison():
    from upcycling.analysis import reinit

    context = {"sizes": {"s": {"n1": 1e5, "n2": 2e5, "n_total": 4e5}}, "d1_values": [1e5]}
    skipped = [
        FitResult.skipped("joint", "run at least 3 dense sizes", {**context, "key": key})
        for key in ("joint.moe_upcycle.e4k2g1", "joint.moe_upcycle.e4k2g1r0.5")
    ]
    fits = FitSet.of({fit.key: fit for fit in skipped})
    assert [group.law for group in reinit.ratio_groups(fits, ("dataset", "joint"))] == ["joint"]
    assert reinit.ratio_groups(fits) == []  # the figure's groups: the dataset law only
    assert reinit.comparisons(fits, []) == []
