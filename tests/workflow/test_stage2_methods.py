"""config/bootstrapped.yaml end to end, with config/drop_upcycling.yaml's two re-initialisation
ratios added: every second-stage method (MoE upcycling at r = 0 and Drop-Upcycling at r = 0.5,
continued pretraining on a second corpus, depth and width growth) through the whole DAG on this CPU,
all from the same dense checkpoints. Each method's initial model loads in transformers and computes
the dense model's loss (r = 0.5 re-draws half of each expert, so it starts worse); the store has a
method dimension and an r coordinate; the report compares the methods and the ratios.

One run for both shipped configs, on smaller grids (both build their whole DAG as shipped:
tests/integration/test_dag.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

from tiny_sweep import REPO_CONFIG_TIMEOUT_S, read_json, run_repo_config

METHODS = ("moe_upcycle", "continue", "grow_depth", "grow_width")
# What config/drop_upcycling.yaml adds to config/bootstrapped.yaml, and the test's cuts: smaller
# grids (2 D1 x 3 D2 per lineage, 3 D from scratch; halved budgets) and a smaller bootstrap. Most
# of a job's time here is its start-up, so the cuts are in jobs: 62 instead of the 114 of both configs.
OVERRIDES = {
    "sweep": {"d1_tokens": [16384, 65536], "d2_tokens": [8192, 16384, 32768], "reinit_ratio": [0, 0.5]},
    "baselines": {"scratch_d_tokens": [8192, 16384, 32768]},
    "training": {"warmup_tokens": 4096, "eval_every_tokens": 16384},
    "fit": {"bootstrap": 8},
}
RUNS = 2 * 3  # per upcycled lineage
PAIR = "upcycled/xs/seed0/d1_65536"

# The whole config runs in the first test's set-up (pytest-timeout counts it).
pytestmark = pytest.mark.timeout(REPO_CONFIG_TIMEOUT_S)


@pytest.fixture(scope="module")
def stage2_methods(tmp_path_factory):
    return run_repo_config(tmp_path_factory.mktemp("stage2_methods"), "bootstrapped", OVERRIDES)


def _hf_loss(export_dir, tokens: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(tokens, labels=tokens).loss)


def test_every_method_starts_from_the_dense_model_in_transformers(stage2_methods):
    """The dense export at D1 and each method's initial export, loaded by transformers (Llama or
    Mixtral), give the same loss on the same held-out tokens: every transform preserves the function."""
    from upcycling.data.tokens import load_tokens

    _, val, _ = load_tokens(stage2_methods / "tokens")
    tokens = torch.from_numpy(val.read(0, 4 * 128).astype(np.int64)).view(4, 128)
    dense = _hf_loss(stage2_methods / "dense/xs/seed0/d1_65536/hf", tokens)
    for method in METHODS:
        variant = "e4_k2_g1" if method == "moe_upcycle" else method
        assert _hf_loss(stage2_methods / PAIR / variant / "init", tokens) == pytest.approx(dense, abs=1e-4), method


def test_the_store_and_the_report_compare_the_methods(stage2_methods):
    store = xr.open_zarr(stage2_methods / "losses.zarr")
    upcycled = store["final_val_loss"].sel(init="upcycled", reinit_ratio=0.0)
    for method in METHODS:
        # A dict, not a keyword: `sel(method=...)` is xarray's fill-method argument.
        assert int(np.isfinite(upcycled.sel({"method": method}).values).sum()) == RUNS, method
    # Continued pretraining on the comedies evaluates on the comedies' held-out text.
    run = read_json(stage2_methods / PAIR / "continue/d2_16384/metrics.json")
    assert run["coords"]["method"] == "continue" and run["model"]["n_layers"] == 2
    grown = read_json(stage2_methods / PAIR / "grow_depth/d2_16384/metrics.json")
    assert grown["model"]["n_layers"] == 4
    summary = (stage2_methods / "report" / "summary.md").read_text()
    # The answer first: the size's table names every method's pair of fits within the first 30 lines.
    answer = "\n".join(summary.splitlines()[:30])
    compared = next(line for line in summary.splitlines() if line.startswith("- **Methods compared with training"))
    assert "Saturation alpha3 by method" in compared
    for method in METHODS:
        assert f"`dataset.{method}.xs." in answer and method in compared, method


def test_both_ratios_train_from_the_same_dense_checkpoints(stage2_methods):
    store = xr.open_zarr(stage2_methods / "losses.zarr")
    assert sorted(store["reinit_ratio"].values.tolist()) == [0.0, 0.5]
    upcycled = store["final_val_loss"].sel({"init": "upcycled", "method": "moe_upcycle"})
    for ratio in (0.0, 0.5):
        assert int(np.isfinite(upcycled.sel(reinit_ratio=ratio).values).sum()) == RUNS, ratio
    # r = 0 keeps plain upcycling's paths; r = 0.5 has its own; both start from one dense export.
    plain = read_json(stage2_methods / PAIR / "e4_k2_g1/d2_32768/metrics.json")
    dropped = read_json(stage2_methods / PAIR / "e4_k2_g1_r0.5/d2_32768/metrics.json")
    assert "reinit_ratio" not in plain["coords"] and dropped["coords"]["reinit_ratio"] == 0.5
    dense_loss = read_json(stage2_methods / "dense/xs/seed0/d1_65536/metrics.json")["final_val_loss"]
    assert plain["curve"]["val_loss"][0] == pytest.approx(dense_loss, abs=1e-4)  # function-preserving
    assert dropped["curve"]["val_loss"][0] > plain["curve"]["val_loss"][0]  # half the FFN re-drawn
    # Re-initialised experts stay less alike than copies of one FFN.
    assert np.mean(dropped["expert_similarity"]) < np.mean(plain["expert_similarity"])


def test_the_report_compares_the_ratios(stage2_methods):
    summary = (stage2_methods / "report" / "summary.md").read_text()
    section = summary[summary.index("Drop-Upcycling: re-initialisation ratio") :]
    assert "0.5" in section and "alpha3" in section
    findings = json.loads((stage2_methods / "report" / "findings.json").read_text())
    assert any(finding["topic"] == "reinit_ratio" for finding in findings)
    assert (stage2_methods / "report" / "reinit_ratio.png").stat().st_size > 0
