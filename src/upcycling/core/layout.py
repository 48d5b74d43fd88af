"""Where a sweep's results live, relative to the results directory.

The path patterns every stage agrees on: the planner names its outputs with them, the report
names its figures with them. ``{wildcards}`` as the Snakemake rules name them.
"""

from __future__ import annotations

# A lineage's runs (upcycling.pipeline.lineages).
DENSE = "dense/{size}/seed{seed}"
UPCYCLED = "upcycled/{size}/seed{seed}/d1_{d1}/{variant}"
SCRATCH = "scratch/{size}/seed{seed}/{variant}"

TOKEN_SETS = ("tokens", "tokens_stage2")  # the first corpus's tokens; stage2.corpus's

# The report's figures: name -> file name under report/.
REPORT_FIGURES = {
    "loss_vs_d2": "loss_vs_d2.png",
    "residuals": "residuals.png",
    "effective_exponent": "effective_exponent.png",
    "break_even": "break_even.png",
    "equal_compute": "equal_compute.png",
    "model_config": "model_config.png",
    "reinit_ratio": "reinit_ratio.png",
}
