"""The fit stage and the report on a synthetic study of the default sweep's shape with three
second-stage methods (tests/synthetic_study.py): the tidy table under both parameter-count
conventions, the plan (keys per method, the sparsity axis feeding the model-configuration law),
every fit written, the guidance with intervals, a report that opens with its findings, and
planning with ``predict`` (the CLIs: integration/test_fit_report_cli.py)."""

import json

import pytest

import synthetic_study as study
from upcycling.analysis import advice, fitstage, report
from upcycling.analysis.figures import FIGURES
from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import FitSet

# the fitted synthetic study (about 40 s, session fixture): the slow lane
pytestmark = pytest.mark.slow


def test_runs_table_counts_parameters_one_way(fitted):
    _, ds, _ = fitted
    table = fitstage.runs_table(ds)
    upcycled = fitstage.select_runs(table, "upcycled", method="moe_upcycle", size="s", experts=4)
    counts = study.counts("s", 4, 2)
    assert set(upcycled["n2_params"]) == {counts.active_non_embedding}
    assert set(upcycled["n1_params"]) == {study.counts("s").non_embedding}
    # non-embedding P is close to the experts' ratio E/k = 2; with the embeddings it is not
    assert upcycled["sparsity"].iloc[0] == pytest.approx(1.797, abs=1e-3)
    total = fitstage.select_runs(
        fitstage.runs_table(ds, "total"), "upcycled", method="moe_upcycle", size="s", experts=4
    )
    assert total["sparsity"].iloc[0] == pytest.approx(counts.total / counts.active)
    assert total["sparsity"].iloc[0] < 1.5
    with pytest.raises(ValueError, match="parameter counts 'nope'"):
        fitstage.runs_table(ds, "nope")
    no_counts = ds.drop_vars("dense_non_embedding_params")
    with pytest.raises(ValueError, match="dense_non_embedding_params.*--parameter-counts total"):
        fitstage.runs_table(no_counts)


def test_plan_keys_carry_the_method_and_the_sparsity_axis_feeds_model_config(fitted):
    _, ds, _ = fitted
    tasks = {str(task.key): task for task in fitstage.plan_fits(fitstage.runs_table(ds))}
    for method, moe in (("moe_upcycle", "e4k2g1"), ("continue", "e1k1g1"), ("grow_depth", "e1k1g1")):
        for size in study.SIZES:
            assert len(tasks[f"dataset.{method}.{size}.{moe}"].rows) == 12
            assert len(tasks[f"scratch_power.{method}.{size}.{moe}"].rows) == 5
        assert len(tasks[f"joint.{method}.{moe}"].rows) == 36
        assert f"chinchilla_scratch.{method}.{moe}" in tasks
    # E = 2 and 8 are run at one (D1, D2) pair: no dataset law of their own
    assert not any(".e2k2g1" in key or ".e8k2g1" in key for key in tasks)
    config = tasks["model_config.moe_upcycle"]
    assert len(config.rows) == 9 and config.context["d1_tokens"] == study.SPARSITY_PAIR[0]
    assert "model_config.continue" not in tasks  # one sparsity (P = 1): nothing to fit
    assert tasks["chinchilla_dense"].rows["init"].eq("dense").all()


def test_fit_all_fits_and_writes_every_law(fitted):
    root, _, fits = fitted
    for key in (
        "dataset.moe_upcycle.xs.e4k2g1",
        "joint.moe_upcycle.e4k2g1",
        "model_config.moe_upcycle",
        "chinchilla_dense",
        "joint.continue.e1k1g1",
        "scratch_power.grow_depth.s.e1k1g1",
    ):
        assert fits[key].ok, (key, fits[key].status_detail)
        assert fits[key].context["parameter_counts"] == "non_embedding"
    assert fits["joint.continue.e1k1g1"].context["method"] == "continue"
    written = fitstage.load_fits(root / "fits")
    assert set(written) == set(fits)
    assert written["joint.moe_upcycle.e4k2g1"].params == pytest.approx(fits["joint.moe_upcycle.e4k2g1"].params)
    # the saturation differs by method as in the truths (continue 0.035, moe_upcycle 0.02)
    assert fits["joint.continue.e1k1g1"].params["alpha3"] > fits["joint.moe_upcycle.e4k2g1"].params["alpha3"] > 0
    # the sparsity exponent of the synthetic runs (0.8) and the size exponent (0.3)
    config = fits["model_config.moe_upcycle"]
    assert config.params["beta1"] == pytest.approx(study.SPARSITY_GAIN["beta1"], abs=0.2)
    assert config.params["beta2"] == pytest.approx(study.TRUE_JOINT["beta2"], abs=0.1)


def test_guidance_has_intervals_verdicts_and_every_crossing(fitted):
    _, _, fits = fitted
    rows = advice.compute_guidance(FitSet.of(fits))
    keys = {(row["upcycled_fit"], row["size"], row["d1"], row["count_sunk_cost"]) for row in rows}
    assert len(keys) == len(rows)
    by_method = {row["method"] for row in rows}
    assert by_method == set(study.METHODS)
    for row in rows:
        low, high = row["d2_star_interval"]
        assert row["d2_range"][0] < row["data_d2_range"][0] and row["d2_range"][1] > row["data_d2_range"][1]
        if row["conclusive"]:
            assert row["d2_range"][0] < low <= high < row["d2_range"][1]
            assert low <= row["d2_star"] * 1.05 and row["d2_star"] <= high * 1.05
        crossings = [c["d2"] for c in row["crossings"]]
        assert crossings == sorted(crossings)
        if row["status"] == "crossing":
            assert row["crossings"][-1]["better_after"] == "scratch"
            assert row["crossings"][-1]["d2"] == pytest.approx(row["d2_star"], rel=1e-9)
    # with the dense cost counted, from scratch starts ahead: two crossings somewhere
    assert any(len(row["crossings"]) == 2 for row in rows if row["count_sunk_cost"])


def test_report_answers_first_then_covers_the_three_laws(fitted, tmp_path):
    _, ds, fits = fitted
    written = report.write_report(ds, fits, None, tmp_path / "report")
    summary = written["summary"].read_text()
    headings = [line for line in summary.splitlines() if line.startswith("## ")]
    assert headings == ["## Upcycle or train from scratch?", "## Findings", "## Details"]
    findings_text = summary[summary.index("## Findings") : summary.index("## Details")]
    for phrase in (
        "alpha3 [95%] by law",
        "> 0: saturation",
        "alpha2 > alpha1 > alpha3",
        "D in billions",
        "ΔAICc",
        "D2* is conclusive in",
        "`model_config.moe_upcycle`",
        "beta1 (sparsity P)",
        "(continue)",
        "trained from scratch",
        "converged cleanly",
    ):
        assert phrase in findings_text, phrase
    assert "non-embedding" in summary
    # the methods compared: continue saturates most in the truths (alpha3 0.035 vs 0.02, 0.01)
    assert "Saturation alpha3 by method (`joint` laws), largest first: continue" in summary
    items = json.loads(written["findings"].read_text())
    topics = {item["topic"] for item in items}
    assert {"interaction", "ordering", "comparison", "break_even", "model_config", "methods", "health"} <= topics
    for name, filename in FIGURES.items():
        png = tmp_path / "report" / filename
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({filename})" in summary
    assert "<h2>Upcycle or train from scratch?</h2>" in written["summary_html"].read_text()
    assert json.loads(written["guidance"].read_text())
    assert not list((tmp_path / "report").glob(".*.tmp"))


def test_report_without_fits(fitted, tmp_path):
    _, ds, _ = fitted
    skipped = {"dataset": FitResult.skipped("dataset", "no upcycled runs in the store")}
    written = report.write_report(ds, skipped, None, tmp_path)
    assert "no upcycled runs" in written["summary"].read_text()
    assert all((tmp_path / f).exists() for f in FIGURES.values())


def test_predict(fitted):
    _, _, fits = fitted
    n1 = study.counts("s").non_embedding
    out = advice.predict(fits, n1, 131072, 262144, experts=4, top_k=2)
    assert out["law"] == "joint.moe_upcycle.e4k2g1"
    low, high = out["interval"]
    assert low <= out["loss"] <= high
    from upcycling.analysis import laws

    assert out["loss"] == pytest.approx(laws.joint(131072, 262144, n1, **study.TRUE_JOINT), rel=0.01)
    assert out["inputs"]["n2"] == pytest.approx(study.counts("s", 4, 2).active_non_embedding)
    counted = out["by_accounting"]["sunk_cost_counted"]
    assert counted["scratch_tokens"] == pytest.approx(262144 + n1 * 131072 / out["inputs"]["n2"])
    assert out["recommendation"] in ("upcycle", "scratch")
    grown = advice.predict(fits, n1, 131072, 262144, experts=1, top_k=1, method="grow_depth")
    assert grown["law"] == "joint.grow_depth.e1k1g1"
    assert grown["by_accounting"]["sunk_cost_not_counted"]["scratch_law"] == "chinchilla_scratch.grow_depth.e1k1g1"
    far = advice.predict(fits, n1, 131072, 1e8, experts=4, top_k=2)
    assert any("outside the runs" in note for note in far["notes"])
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match="no fitted law"):
        advice.predict(fits, n1, 1e5, 1e5, experts=8, top_k=2)


def test_report_without_from_scratch_fits_says_there_is_no_guidance(fitted, tmp_path):
    _, ds, fits = fitted
    upcycled_only = {key: fit for key, fit in fits.items() if "scratch" not in key}
    written = report.write_report(ds, upcycled_only, None, tmp_path)
    summary = written["summary"].read_text()
    assert "No pair of fitted upcycled and from-scratch laws: no guidance." in summary
    assert json.loads(written["guidance"].read_text()) == []
    assert "no from-scratch law of this method to compare with" in summary
