"""config/bootstrapped.yaml end to end: every second-stage method (MoE upcycling, continued
pretraining on a second corpus, depth and width growth) through the whole DAG on this CPU; each
method's initial model loads in transformers and computes the dense model's loss; the store has a
method dimension and the report compares the methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from tiny_sweep import REPO_CONFIG_TIMEOUT_S, read_json, run_repo_config

METHODS = ("moe_upcycle", "continue", "grow_depth", "grow_width")


# The whole shipped config runs in the first test's set-up (pytest-timeout counts it).
pytestmark = pytest.mark.timeout(REPO_CONFIG_TIMEOUT_S)


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory):
    return run_repo_config(tmp_path_factory.mktemp("bootstrapped"), "bootstrapped")


def _hf_loss(export_dir, tokens: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(tokens, labels=tokens).loss)


def test_every_method_starts_from_the_dense_model_in_transformers(bootstrapped):
    """The dense export at D1 and each method's initial export, loaded by transformers (Llama or
    Mixtral), give the same loss on the same held-out tokens: every transform preserves the function."""
    from upcycling.data.tokens import load_tokens

    _, val, _ = load_tokens(bootstrapped / "tokens")
    tokens = torch.from_numpy(val.read(0, 4 * 128).astype(np.int64)).view(4, 128)
    dense = _hf_loss(bootstrapped / "dense/xs/seed0/d1_65536/hf", tokens)
    for method in METHODS:
        variant = "e4_k2_g1" if method == "moe_upcycle" else method
        init = bootstrapped / f"upcycled/xs/seed0/d1_65536/{variant}/init"
        assert _hf_loss(init, tokens) == pytest.approx(dense, abs=1e-4), method


def test_the_store_and_the_report_compare_the_methods(bootstrapped):
    store = xr.open_zarr(bootstrapped / "losses.zarr")
    upcycled = store["final_val_loss"].sel(init="upcycled")
    for method in METHODS:
        # A dict, not a keyword: `sel(method=...)` is xarray's fill-method argument.
        assert int(np.isfinite(upcycled.sel({"method": method}).values).sum()) == 9, method  # 3 D1 x 3 D2
    # Continued pretraining on the comedies evaluates on the comedies' held-out text.
    run = read_json(bootstrapped / "upcycled/xs/seed0/d1_65536/continue/d2_16384/metrics.json")
    assert run["coords"]["method"] == "continue" and run["model"]["n_layers"] == 2
    grown = read_json(bootstrapped / "upcycled/xs/seed0/d1_65536/grow_depth/d2_16384/metrics.json")
    assert grown["model"]["n_layers"] == 4
    summary = (bootstrapped / "report" / "summary.md").read_text()
    # The answer first: the size's table names every method's pair of fits within the first 30 lines.
    answer = "\n".join(summary.splitlines()[:30])
    compared = next(line for line in summary.splitlines() if line.startswith("- **Methods compared with training"))
    assert "Saturation alpha3 by method" in compared
    for method in METHODS:
        assert f"`dataset.{method}.xs." in answer and method in compared, method
