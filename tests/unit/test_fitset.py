"""Fit keys and the fit set (upcycling.analysis.fitset): every key the fit stage plans reads back
to itself (the fits' file names and the report's keys stay as they are), keys sort as their
files do, a malformed key is refused naming the expected shape, and the fit set pairs each
upcycled fit with its from-scratch fit for the guidance, the findings and the figures."""

from __future__ import annotations

import re

import pytest

import synthetic_study as study
from upcycling.analysis import fitstage
from upcycling.analysis import store as results
from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import FitKey, FitSet, MoeVariant
from upcycling.analysis.laws import LAWS
from upcycling.core.errors import InputError

E4 = MoeVariant(4, 2, 1)
DENSE = MoeVariant(1, 1, 1)


def _planned_keys(**study_options) -> list[FitKey]:
    ds = results.build_dataset(study.records(**study_options), "tokenizer:\n  vocab_size: 2048\n", "synthetic")
    return [task.key for task in fitstage.plan_fits(fitstage.runs_table(ds))]


def test_every_planned_key_reads_back_to_itself():
    keys = _planned_keys(methods=("moe_upcycle", "continue", "grow_depth", "grow_width"))
    strings = {str(key) for key in keys}
    for text in (  # the shapes of docs/fits.md, as the default report names them
        "dataset.moe_upcycle.s.e4k2g1",
        "dataset_additive.continue.xxs.e1k1g1",
        "joint_no_interaction.grow_depth.e1k1g1",
        "chinchilla_scratch.moe_upcycle.e4k2g1",
        "scratch_power.grow_width.xs.e1k1g1",
        "model_config.moe_upcycle",
        "chinchilla_dense",
    ):
        assert text in strings, text
    # with no upcycled and no from-scratch runs, the skipped laws are named by their law alone
    dense_only = [record for record in study.records() if record["coords"]["init"] == "dense"]
    ds = results.build_dataset(dense_only, "", "synthetic")
    law_only = [task.key for task in fitstage.plan_fits(fitstage.runs_table(ds))]
    assert {str(key) for key in law_only} == {
        "dataset",
        "joint",
        "model_config",
        "chinchilla_dense",
        "chinchilla_scratch",
    }
    for key in keys + law_only:
        assert FitKey.parse(str(key)) == key
        assert str(FitKey.parse(str(key))) == str(key)


def test_keys_sort_as_their_file_names_do():
    texts = [
        "scratch_power.moe_upcycle.xs.e4k2g1",
        "dataset_no_interaction.moe_upcycle.s.e4k2g1",
        "dataset.moe_upcycle.xxs.e16k2g1",
        "dataset.moe_upcycle.xxs.e4k2g1",
        "chinchilla_dense",
        "dataset.continue.s.e1k1g1",
        "joint.moe_upcycle.e4k2g1",
        "dataset.moe_upcycle.s.e4k2g1",
    ]
    assert [str(key) for key in sorted(FitKey.parse(text) for text in texts)] == sorted(texts)


def test_key_shapes_cover_every_law():
    for law in LAWS:
        assert FitKey.parse(law) == FitKey(law)  # every law has a key shape


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("datset.moe_upcycle.s.e4k2g1", "unknown law 'datset'"),
        ("dataset.moe_upcycle.e4k2g1", "a dataset key is dataset.<method>.<size>.<moe>"),
        ("joint.moe_upcycle.s.e4k2g1", "a joint key is joint.<method>.<moe>"),
        ("dataset.moe_upcycle.s.e4k2", "fit key 'dataset.moe_upcycle.s.e4k2': MoE variant 'e4k2': expected e<experts>"),
        ("chinchilla_dense.moe_upcycle", "a chinchilla_dense key is chinchilla_dense alone"),
    ],
)
def test_a_malformed_key_is_refused_with_its_expected_shape(text, named):
    with pytest.raises(InputError, match=re.escape(named)):
        FitKey.parse(text)


def test_a_key_missing_a_segment_of_its_law_is_refused():
    with pytest.raises(InputError, match=r"dataset\.<method>\.<size>\.<moe>"):
        FitKey("dataset", "moe_upcycle", moe=E4)


def _fit(key: str, sizes=("s",), ok: bool = True) -> FitResult:
    law = key.split(".")[0]
    context = {"key": key, "sizes": {size: {"n1": 1e5, "n2": 2e5, "n_total": 4e5} for size in sizes}}
    if not ok:
        return FitResult.skipped(law, "too few runs", context)
    return FitResult(law=law, formula="", variables={}, params={"E": 2.0}, context=context)


def _fit_set(*fits: FitResult) -> FitSet:
    return FitSet.of({fit.key: fit for fit in fits})


def test_a_dataset_fit_pairs_with_its_size_and_variant_and_falls_back_across_sizes():
    fits = _fit_set(
        _fit("dataset.moe_upcycle.s.e4k2g1"),
        _fit("dataset.moe_upcycle.s.e8k2g1"),
        _fit("dataset.moe_upcycle.xs.e4k2g1", sizes=("xs",)),
        _fit("scratch_power.moe_upcycle.s.e4k2g1"),
        _fit("scratch_power.moe_upcycle.s.e8k2g1"),
        _fit("scratch_power.moe_upcycle.xs.e4k2g1", ok=False),
        _fit("chinchilla_scratch.moe_upcycle.e4k2g1", sizes=("s", "xs")),
    )
    pairs = {(str(p.upcycled_key), p.size): str(p.scratch_key) for p in fits.upcycled_pairs()}
    assert pairs == {
        ("dataset.moe_upcycle.s.e4k2g1", "s"): "scratch_power.moe_upcycle.s.e4k2g1",
        ("dataset.moe_upcycle.s.e8k2g1", "s"): "scratch_power.moe_upcycle.s.e8k2g1",  # its own variant
        ("dataset.moe_upcycle.xs.e4k2g1", "xs"): "chinchilla_scratch.moe_upcycle.e4k2g1",  # size not fitted
    }


def test_a_joint_fit_pairs_at_every_size_with_the_law_across_sizes_first():
    joint = _fit("joint.continue.e1k1g1", sizes=("s", "xs"))
    scratch_s = _fit("scratch_power.continue.s.e1k1g1")
    alone = _fit_set(joint, scratch_s)
    assert [(p.size, str(p.scratch_key)) for p in alone.upcycled_pairs()] == [("s", "scratch_power.continue.s.e1k1g1")]
    both = _fit_set(joint, scratch_s, _fit("chinchilla_scratch.continue.e1k1g1", sizes=("s", "xs")))
    assert [(p.size, str(p.scratch_key)) for p in both.upcycled_pairs()] == [
        ("s", "chinchilla_scratch.continue.e1k1g1"),
        ("xs", "chinchilla_scratch.continue.e1k1g1"),
    ]
    # without a size (the findings' comparison of methods): the law across sizes only
    assert both.scratch_for(FitKey("joint", "continue", moe=DENSE)) == (
        FitKey("chinchilla_scratch", "continue", moe=DENSE),
        both[FitKey("chinchilla_scratch", "continue", moe=DENSE)],
    )
    assert alone.scratch_for(FitKey("joint", "continue", moe=DENSE)) is None


def test_an_upcycled_fit_without_a_from_scratch_partner_is_left_out():
    fits = _fit_set(
        _fit("dataset.grow_depth.s.e1k1g1"),
        _fit("scratch_power.continue.s.e1k1g1"),  # another method's from-scratch runs
        _fit("dataset.moe_upcycle.s.e4k2g1"),
        _fit("scratch_power.moe_upcycle.s.e4k2g1"),
    )
    assert [str(p.upcycled_key) for p in fits.upcycled_pairs()] == ["dataset.moe_upcycle.s.e4k2g1"]
    assert fits.scratch_for(FitKey("dataset", "grow_depth", "s", DENSE)) is None


def test_fits_by_law_method_size_and_variant():
    fits = _fit_set(
        _fit("dataset.moe_upcycle.s.e4k2g1"),
        _fit("dataset.moe_upcycle.xs.e4k2g1", ok=False),
        _fit("dataset.continue.s.e1k1g1"),
        _fit("dataset_additive.moe_upcycle.s.e4k2g1"),
        _fit("joint.moe_upcycle.e4k2g1"),
    )
    assert [str(k) for k, _ in fits.select(["dataset"])] == [
        "dataset.continue.s.e1k1g1",
        "dataset.moe_upcycle.s.e4k2g1",
        "dataset.moe_upcycle.xs.e4k2g1",
    ]
    assert [str(k) for k, _ in fits.select(["dataset"], fitted=True, method="moe_upcycle")] == [
        "dataset.moe_upcycle.s.e4k2g1"
    ]
    assert [str(k) for k, _ in fits.select(size="s", moe=E4)] == [
        "dataset.moe_upcycle.s.e4k2g1",
        "dataset_additive.moe_upcycle.s.e4k2g1",
    ]
    key = FitKey.parse("dataset.moe_upcycle.s.e4k2g1")
    assert fits.fitted(key.with_law("dataset_additive")) is fits[FitKey.parse("dataset_additive.moe_upcycle.s.e4k2g1")]
    assert fits.fitted(FitKey.parse("dataset.moe_upcycle.xs.e4k2g1")) is None  # skipped


def test_a_fit_saved_under_another_name_is_refused():
    with pytest.raises(InputError, match="dataset.moe_upcycle.xs.e4k2g1.*holds the fit 'dataset.moe_upcycle.s.e4k2g1'"):
        FitSet.of({"dataset.moe_upcycle.xs.e4k2g1": _fit("dataset.moe_upcycle.s.e4k2g1")})
