# Shared by every rule: the checked config, the results root, the sweep's jobs.
from pathlib import Path

from upcycling import sweep
from upcycling.config import ConfigError, validate_config
from upcycling.resources import job_resources, scheduler_placement

# Semantic checks the schema cannot express; a bad config stops here, before any job runs.
try:
    validate_config(config, workflow.basedir, check_schema=False)
except ConfigError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None

R = sweep.results_root(config)
CONFIG_ARGS = f"--config {workflow.configfiles[-1] if workflow.configfiles else 'config/config.yaml'}"
LOGS = R / "logs"
WSD = config["training"]["schedule"] == "wsd"

wildcard_constraints:
    size="|".join(config["dense_models"]),
    seed=r"\d+",
    d1=r"\d+",
    d2=r"\d+",
    d=r"\d+",
    point=r"\d+",
    experts=r"\d+",
    top_k=r"\d+",
    granularity=r"\d+",


def stable_input(family, lineage_path):
    """Input function: the previous stable job of a chain (nothing for the first)."""

    def inputs(wildcards):
        previous = sweep.previous_stable_point(config, family, int(wildcards.point))
        return [] if previous is None else [str(R / lineage_path.format(**wildcards) / f"stable_{previous}.json")]

    return inputs


def decay_input(family, lineage_path):
    """Input function: a run's stable job (WSD) or nothing (cosine runs start fresh)."""

    def inputs(wildcards):
        if not WSD:
            return []
        budget = int(getattr(wildcards, {"dense": "d1", "upcycled": "d2", "scratch": "d"}[family]))
        return [str(R / lineage_path.format(**wildcards) / f"stable_{sweep.decay_start(config, budget)}.json")]

    return inputs


def resources_for(family, phase):
    """Scheduler resources of a training rule, computed per job from its wildcards."""
    names = ["runtime", "mem_mb", "gpu", "cpus_per_task", "nodes", "slurm_extra", *scheduler_placement(config)]
    return {name: (lambda wildcards, name=name: job_resources(config, family, phase, wildcards)[name])
            for name in names}
