"""The sweep as jobs: which runs exist, how WSD chains them, and where each job writes.

Pure functions of the config, shared by the Snakefile (targets and rule inputs), the CLI (which
job to build from wildcards) and the admin's plan. A *run* is one trained model at one token
budget D (it writes a metrics JSON); with WSD a run is a chain of stable jobs plus its own decay
job, and runs of the same model share the stable jobs.

Families: ``dense`` (size, seed, D1), ``upcycled`` (size, seed, D1, E, k, G, D2) and ``scratch``
(size, seed, E, k, G, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Lineage:
    """Everything that one chain of jobs shares: the model and where it starts."""

    family: str  # dense | upcycled | scratch
    size: str
    seed: int
    d1: int = 0  # upcycled: the dense budget it was upcycled from
    experts: int = 1
    top_k: int = 1
    granularity: int = 1

    @property
    def name(self) -> str:
        base = f"{self.family}/{self.size}/seed{self.seed}"
        if self.family == "dense":
            return base
        moe = f"e{self.experts}_k{self.top_k}_g{self.granularity}"
        return f"{base}/d1_{self.d1}/{moe}" if self.family == "upcycled" else f"{base}/{moe}"


def budgets(cfg: dict, family: str) -> list[int]:
    """The token budgets D of a family's runs."""
    if family == "dense":
        return list(cfg["sweep"]["d1_tokens"])
    if family == "upcycled":
        return list(cfg["sweep"]["d2_tokens"])
    return list(cfg["baselines"].get("scratch_d_tokens", cfg["sweep"]["d2_tokens"]))


def decay_start(cfg: dict, budget: int) -> int:
    """WSD: the token count where the run of budget D leaves the stable phase."""
    return int(budget * (1 - cfg["training"]["decay_fraction"]))


def stable_points(cfg: dict, family: str) -> list[int]:
    return [decay_start(cfg, budget) for budget in budgets(cfg, family)] if cfg["training"]["schedule"] == "wsd" else []


def previous_stable_point(cfg: dict, family: str, point: int) -> int | None:
    points = stable_points(cfg, family)
    index = points.index(point)
    return points[index - 1] if index else None


def lineages(cfg: dict) -> list[Lineage]:
    sweep, baselines = cfg["sweep"], cfg["baselines"]
    result: list[Lineage] = []
    moe_shapes = [(e, k, g) for e in sweep["experts"] for k in sweep["top_k"] for g in sweep["granularity"]]
    for size in cfg["dense_models"]:
        for seed in cfg["training"]["seeds"]:
            result.append(Lineage("dense", size, seed))
            for d1 in sweep["d1_tokens"]:
                result.extend(Lineage("upcycled", size, seed, d1, e, k, g) for e, k, g in moe_shapes)
            if baselines.get("scratch_moe", True):
                result.extend(Lineage("scratch", size, seed, 0, e, k, g) for e, k, g in moe_shapes)
    return result


# ----------------------------------------------------------------------------- paths


def results_root(cfg: dict) -> Path:
    return Path(cfg.get("results_dir", "results"))


def tokens_dir(cfg: dict) -> Path:
    return results_root(cfg) / "tokens"


def run_dir(cfg: dict, lineage: Lineage, budget: int) -> Path:
    prefix = {"dense": "d1", "upcycled": "d2", "scratch": "d"}[lineage.family]
    return results_root(cfg) / lineage.name / f"{prefix}_{budget}"


def metrics_path(cfg: dict, lineage: Lineage, budget: int) -> Path:
    return run_dir(cfg, lineage, budget) / "metrics.json"


def stable_state_path(cfg: dict, lineage: Lineage, point: int) -> Path:
    return results_root(cfg) / lineage.name / f"stable_{point}.json"


def checkpoint_dir(cfg: dict, lineage: Lineage, job: str) -> Path:
    """DeepSpeed checkpoints live outside Snakemake's outputs, so a failed or preempted job's
    checkpoint survives Snakemake's cleanup of incomplete outputs and the rerun resumes from it."""
    return results_root(cfg) / "checkpoints" / lineage.name / job


def dense_export_dir(cfg: dict, size: str, seed: int, d1: int) -> Path:
    return run_dir(cfg, Lineage("dense", size, seed), d1) / "hf"


def upcycled_init_dir(cfg: dict, lineage: Lineage) -> Path:
    return results_root(cfg) / lineage.name / "init"


def all_metrics(cfg: dict) -> list[Path]:
    """Every run's metrics JSON: the targets that the aggregate rule gathers."""
    return [metrics_path(cfg, lineage, budget) for lineage in lineages(cfg) for budget in budgets(cfg, lineage.family)]
