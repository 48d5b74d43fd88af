"""The rules of the DAG by name: their output paths and logs, relative to the results directory.

The Snakefile's rules declare these patterns and the job inventory (:mod:`upcycling.pipeline.jobs`)
fills them in per job; nothing else spells an output path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from upcycling.core.layout import DENSE, SCRATCH, UPCYCLED

# Output paths of every rule, relative to the results directory; {wildcards} as the rules name them.
PATTERNS: dict[str, dict[str, str]] = {
    "train_tokenizer": {"tokenizer": "tokens/tokenizer.json"},
    # {tokens}: "tokens", or "tokens_stage2" for stage2.corpus (tokenized with the first's tokenizer)
    "tokenize_shard": {
        "train": "{tokens}/shards/{shard}/train.bin",
        "val": "{tokens}/shards/{shard}/val.bin",
        "sidecar": "{tokens}/shards/{shard}/shard.json",
    },
    "tokenize": {"meta": "{tokens}/meta.json"},
    "dense_stable": {"checkpoint": f"checkpoints/{DENSE}/stable_{{point}}"},
    "dense_final": {
        "metrics": f"{DENSE}/d1_{{d1}}/metrics.json",
        "weights": f"{DENSE}/d1_{{d1}}/hf/model.safetensors",
        "hf_config": f"{DENSE}/d1_{{d1}}/hf/config.json",
    },
    "transform": {"weights": f"{UPCYCLED}/init/model.safetensors", "hf_config": f"{UPCYCLED}/init/config.json"},
    "upcycled_stable": {"checkpoint": f"checkpoints/{UPCYCLED}/stable_{{point}}"},
    "upcycled_final": {"metrics": f"{UPCYCLED}/d2_{{d2}}/metrics.json"},
    "scratch_stable": {"checkpoint": f"checkpoints/{SCRATCH}/stable_{{point}}"},
    "scratch_final": {"metrics": f"{SCRATCH}/d_{{d}}/metrics.json"},
    "aggregate": {"store": "losses.zarr"},
    "fit": {"fits": "fits"},
    "report": {"summary": "report/summary.md", "findings": "report/findings.json", "guidance": "report/guidance.json"},
}
# Each job's log, relative to the results directory.
LOGS: dict[str, str] = {
    "train_tokenizer": "logs/tokens/train_tokenizer.log",
    "tokenize_shard": "logs/{tokens}/shard_{shard}.log",
    "tokenize": "logs/{tokens}/gather.log",
    "dense_stable": f"logs/{DENSE}/stable_{{point}}.log",
    "dense_final": f"logs/{DENSE}/d1_{{d1}}.log",
    "transform": f"logs/{UPCYCLED}/transform.log",
    "upcycled_stable": f"logs/{UPCYCLED}/stable_{{point}}.log",
    "upcycled_final": f"logs/{UPCYCLED}/d2_{{d2}}.log",
    "scratch_stable": f"logs/{SCRATCH}/stable_{{point}}.log",
    "scratch_final": f"logs/{SCRATCH}/d_{{d}}.log",
    "aggregate": "logs/aggregate.log",
    "fit": "logs/fit.log",
    "report": "logs/report.log",
}
BUDGET_KEY = {"dense": "d1", "upcycled": "d2", "scratch": "d"}  # the wildcard of a run's budget D
TRAINING_RULES = tuple(f"{family}_{phase}" for family in BUDGET_KEY for phase in ("stable", "final"))
RULES = (
    "train_tokenizer",
    "tokenize_shard",
    "tokenize",
    "dense_stable",
    "dense_final",
    "transform",
    "upcycled_stable",
    "upcycled_final",
    "scratch_stable",
    "scratch_final",
    "aggregate",
    "fit",
    "report",
)


def results_paths(rule: str, wildcards: Mapping[str, str]) -> dict[str, str]:
    """The rule's outputs relative to the results directory: how a spec names them. A spec holds no
    path outside the results directory, so a job's params, its fingerprint and the metrics'
    ``spec_sha256`` are the same wherever the results live (moved, copied, reached by a link)."""
    return {name: pattern.format(**wildcards) for name, pattern in PATTERNS[rule].items()}


def input_path(path: str | Path) -> str:
    """A file outside the results directory (a corpus file) as a job's input: relative to the working
    directory where it lies under it (a checkout moved whole keeps its inputs), else its real
    absolute path (a corpus elsewhere, however it is reached: through a link, or from another
    working directory). Snakemake reruns a job whose set of input paths changed."""
    real, here = os.path.realpath(path), os.path.realpath(os.getcwd())
    return os.path.relpath(real, here) if real == here or real.startswith(here.rstrip(os.sep) + os.sep) else real
