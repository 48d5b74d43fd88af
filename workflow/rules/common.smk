# Shared by every rule: the checked config, the results root, the sweep's jobs.
from pathlib import Path

from upcycling import sweep
from upcycling.config import ConfigError, validate_config, write_config
from upcycling.launch import srun_prefix
from upcycling.resources import cpus_per_process, job_resources, launch_resources, processes, scheduler_placement

# Semantic checks the schema cannot express; a bad config stops here, before any job runs.
try:
    validate_config(config, workflow.basedir, check_schema=False)
except ConfigError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None

R = sweep.results_root(config)
# Jobs read the sweep the DAG was built from, --config KEY=VALUE overrides included.
CONFIG_ARGS = f"--config {write_config(config, R / 'sweep.yaml')}"
LOGS = R / "logs"
WSD = config["training"]["schedule"] == "wsd"
# One process per GPU: a job with several starts them with srun inside its allocation ("" for one).
_PER_NODE, _NODES = processes(config)
TRAIN = " ".join(["OMP_NUM_THREADS={threads}", *srun_prefix(_PER_NODE, _NODES, cpus_per_process(config)),
                  "upcycling train", CONFIG_ARGS])

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
    """Scheduler resources of a training rule: runtime and memory per job from its wildcards, how
    it is launched and placed from the config."""
    per_job = {name: (lambda wildcards, name=name: job_resources(config, family, phase, wildcards)[name])
               for name in ("runtime", "mem_mb", "cpus_per_task", "slurm_extra")}
    return {**per_job, **launch_resources(config), **scheduler_placement(config)}
