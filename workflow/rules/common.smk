# Shared by every rule: the checked sweep, its job inventory, and how a rule reads its jobs.
import re
import sys

from upcycling.cluster.resources import cpus_per_process, job_resources
from upcycling.core.layout import REPORT_FIGURES, TOKEN_SETS
from upcycling.pipeline.jobs import LOGS, PATTERNS, TRAINING_RULES, Inventory
from upcycling.pipeline.lineages import VARIANT_PATTERN
from upcycling.sweep.load import ConfigError, checked_corpora, sweep_from_mapping

# The schema's defaults and the semantic checks; a bad config stops here, before any job runs.
# The corpus files are found once: by the corpus checks, which hand them to the inventory.
try:
    SWEEP = sweep_from_mapping(config, workflow.basedir, check_corpus=False)
    CORPORA = checked_corpora(SWEEP, workflow.basedir)
except ConfigError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None
INVENTORY = Inventory(SWEEP, corpora=CORPORA)

if workflow.remote_exec and "SLURM_JOB_ID" in os.environ:
    # In a Slurm job, the time-limit warning and a preemption or scancel reach every process of
    # the step: this job wrapper and the rule's shell must outlive the trainer's save.
    from upcycling.cluster.launch import leave_stop_signals_to_the_trainer

    leave_stop_signals_to_the_trainer()

R = SWEEP.results_dir
BASEDIR = workflow.basedir  # where relative corpus and tokenizer paths start

# Paths: a job's spec (its params) names what it reads and writes relative to the results
# directory, and every command gets that directory as `--results {R:q}`. Snakemake records a
# shell rule's command as written (the placeholders, not their values) and the params as values,
# so neither changes when the checkout moves, the results are copied, or the Snakefile is reached
# through a link. Every path in a command is quoted ({...:q}), logs included.

# A training job: its spec (params) is everything its result depends on; launcher and run_options
# (resources) are how it runs, which Snakemake's rerun triggers ignore. The log keeps every attempt.
TRAIN = (
    "OMP_NUM_THREADS={threads} {resources.launcher} upcycling train --spec {params.spec:q} --results {R:q} "
    "{resources.run_options} >> {log:q} 2>&1"
)


wildcard_constraints:
    size="|".join(re.escape(size) for size in SWEEP.dense_models),
    seed=r"\d+",
    d1=r"\d+",
    d2=r"\d+",
    d=r"\d+",
    point=r"\d+",
    shard=r"\d+-of-\d+",
    tokens="|".join(TOKEN_SETS),
    variant=VARIANT_PATTERN,


# One run per results directory (upcycling.core.lock): taken when jobs are about to run (onstart
# runs neither in a dry run nor in a cluster job's wrapper, which Snakemake starts with --no-hooks),
# held until this process ends. The jobs it runs inherit it (HELD_ENV in their environment); a
# second run on the same results stops here, before any job ran or any file was removed.
RESULTS_LOCK = None


def take_results_lock():
    global RESULTS_LOCK
    from upcycling.core.errors import InputError
    from upcycling.core.lock import ResultsLock, inherited, mark_held

    if workflow.remote_exec or inherited(R):
        return
    try:
        RESULTS_LOCK = ResultsLock(R, "snakemake " + " ".join(sys.argv[1:])).acquire()
    except InputError as exc:
        raise WorkflowError(str(exc)) from None
    mark_held(R)


def release_results_lock():
    if RESULTS_LOCK is not None:
        RESULTS_LOCK.release()


onstart:
    take_results_lock()
    # Before the first sbatch (the executor is known only now, not while the Snakefile is read):
    # can this cluster run every job? `upcycling plan --check` does the same.
    if getattr(workflow.executor_plugin, "cli_prefix", None) == "slurm":
        from upcycling.cluster.preflight import problems, read_cluster

        cluster = read_cluster()
        found = problems(INVENTORY, cluster) if cluster is not None else []
        if found:
            raise WorkflowError(
                "this Slurm cluster cannot run the sweep (nothing was submitted):\n- " + "\n- ".join(found)
            )
        # Jobs a dead earlier driver left running would train beside this run's copies.
        from upcycling.cluster.earlier import cancel_earlier_jobs

        cancel_earlier_jobs(workflow.workdir_init, [rule.name for rule in workflow.rules])


def outputs(rule_name):
    """The rule's output patterns; a stable checkpoint is temp() unless the config keeps them."""
    patterns = {name: str(R / pattern) for name, pattern in PATTERNS[rule_name].items()}
    if rule_name.endswith("_stable"):
        stable_dir = directory(patterns["checkpoint"])
        patterns["checkpoint"] = stable_dir if SWEEP.training.keep_stable_checkpoints else temp(stable_dir)
    return patterns


def log_of(rule_name):
    return str(R / LOGS[rule_name])


def inputs_of(rule_name):
    if rule_name in TRAINING_RULES:
        return lambda wildcards: _training_inputs(INVENTORY.find(rule_name, wildcards).inputs)
    return lambda wildcards: dict(INVENTORY.find(rule_name, wildcards).inputs)


def _training_inputs(inputs):
    """A training job reads its tokens through meta.json, but depends on them through its spec: the
    spec's `tokens` fingerprint is what the tokens are a function of (the corpus files and the
    tokens settings). meta.json is rewritten whenever the tokens stage reruns, also when only its
    sharding changed (same tokens), so its time must not rerun training: ancient()."""
    return {name: ancient(path) if name == "meta" else path for name, path in inputs.items()}


def spec_of(rule_name):
    return lambda wildcards: INVENTORY.find(rule_name, wildcards).params


_RESOURCES = {}


def resources_of(rule_name):
    """Per-job resources (upcycling.cluster.resources) as Snakemake resource callables."""

    def value(wildcards, name):
        job = INVENTORY.find(rule_name, wildcards)
        if job.label not in _RESOURCES:
            _RESOURCES[job.label] = job_resources(SWEEP, job)
        return _RESOURCES[job.label][name]

    jobs = INVENTORY.of_rule(rule_name)
    names = job_resources(SWEEP, jobs[0]) if jobs else {}
    return {name: (lambda wildcards, name=name: value(wildcards, name)) for name in names}


onsuccess:
    release_results_lock()


onerror:
    release_results_lock()
