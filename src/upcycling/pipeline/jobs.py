"""The job inventory: every job of the DAG, as a pure function of the sweep.

The Snakefile's rules, ``upcycling plan``, the per-job resources, the CLI (which builds a job from
its identity) and the tests all read this one list; nothing else enumerates jobs.

A *run* is one trained model at one token budget D (it writes a metrics JSON); its lineage
(:mod:`upcycling.pipeline.lineages`) is the chain of jobs that shares its model and start. With WSD a
lineage is a chain of stable jobs plus one decay job per budget; with cosine, one job per budget.

Every job carries a *spec*: the part of the sweep its result depends on, plus the fingerprint of
the job it starts from. The spec is the job's Snakemake ``params`` (so Snakemake's params trigger
reruns exactly the jobs a config change touches, and their downstream) and what the job itself
runs from (``upcycling train --spec ...``): a job cannot run with settings other than the ones its
DAG was built from. Operational settings that do not change a result (log and checkpoint
intervals, keeping final checkpoints) are not in the spec: they ride in ``run_options``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycling.core.errors import InputError
from upcycling.core.fingerprint import canonical_json, fingerprint
from upcycling.core.spec import Fresh, FromExport, TrainSpec
from upcycling.pipeline.lineages import Lineage, lineages, stable_points
from upcycling.pipeline.rules import BUDGET_KEY, LOGS, PATTERNS, RULES, TRAINING_RULES, input_path, results_paths
from upcycling.pipeline.trainspecs import RESULT_TRAINING_KEYS, Chain, Origin, train_spec
from upcycling.sweep.models import options_for, token_sets
from upcycling.sweep.settings import Sweep

# The rules' names and patterns, and the spec's training keys, are read from here too.
__all__ = [
    "BUDGET_KEY",
    "LOGS",
    "PATTERNS",
    "RESULT_TRAINING_KEYS",
    "RULES",
    "TRAINING_RULES",
    "Inventory",
    "Job",
    "UnknownJob",
    "jobs",
    "result_config",
]

# Tokenizer settings that only estimate runtimes (the rest decide the tokens).
TOKENIZER_ESTIMATES = ("threads", "tokens_per_s_per_core", "bytes_per_token")


@dataclass(frozen=True)
class Job:
    rule: str
    wildcards: Mapping[str, str]
    outputs: Mapping[str, str]
    inputs: Mapping[str, str]
    log: str
    # A training job's is a TrainSpec (the trainer's typed contract); every other rule's a mapping.
    spec: Mapping[str, Any] | TrainSpec = field(default_factory=dict, repr=False)
    lineage: Lineage | None = None
    phase: str | None = None  # training jobs: stable | final
    tokens: int = 0  # tokens this job trains
    cost: Any = None  # tokens-stage jobs: their estimate (upcycling.data.tokens.TokenizeJob)

    @property
    def label(self) -> str:
        return _label(self.rule, self.wildcards)

    @property
    def train_spec(self) -> TrainSpec:
        """A training job's spec; TypeError for a job of another rule."""
        if not isinstance(self.spec, TrainSpec):
            raise TypeError(f"{self.label} is not a training job: it has no TrainSpec")
        return self.spec

    @property
    def fingerprint(self) -> str:
        return fingerprint(_plain(self.spec))

    @property
    def params(self) -> str:
        """The Snakemake ``params`` value: the spec as canonical JSON."""
        return canonical_json(_plain(self.spec))


def _plain(spec: Mapping[str, Any] | TrainSpec) -> Mapping[str, Any]:
    return spec.to_dict() if isinstance(spec, TrainSpec) else spec


def _mapping(job: Job) -> Mapping[str, Any]:
    """The spec of a job that is not a training job (the tokens, the transform)."""
    if isinstance(job.spec, TrainSpec):
        raise TypeError(f"{job.label} is a training job: read its train_spec")
    return job.spec


def _label(rule: str, wildcards: Mapping[str, str]) -> str:
    return f"{rule}[{','.join(f'{k}={v}' for k, v in wildcards.items())}]"


def _continuing(origin: Origin, job: Job | None) -> Origin:
    """The origin of a job that continues ``job``'s checkpoint (None: the lineage's ``origin``)."""
    if job is None:
        return origin
    return origin.continued(job.outputs["checkpoint"], _in_results(job, "checkpoint"), job.fingerprint)


def _outputs(sweep: Sweep, rule: str, wildcards: Mapping[str, str]) -> dict[str, str]:
    return {name: str(sweep.results_dir / pattern.format(**wildcards)) for name, pattern in PATTERNS[rule].items()}


def _in_results(job: Job, output: str) -> str:
    """``job``'s output ``output`` relative to the results directory."""
    return results_paths(job.rule, job.wildcards)[output]


def _parent(path: str) -> str:
    return Path(path).parent.as_posix()


def _log(sweep: Sweep, rule: str, wildcards: Mapping[str, str]) -> str:
    return str(sweep.results_dir / LOGS[rule].format(**wildcards))


# ----------------------------------------------------------------------------- the inventory


def jobs(sweep: Sweep, corpora: dict[str, list | None] | None = None) -> list[Job]:
    """Every job of the sweep, each after the jobs it depends on. ``corpora``: the corpus files
    (upcycling.data.corpus.Source) of each token set (TOKEN_SETS), None to plan that set's tokens stage
    from an estimate (no corpus at hand)."""
    if corpora is None:
        corpora = {name: None for name in token_sets(sweep)}
    return list(_jobs(sweep, corpora))


def _corpus_estimate(sweep: Sweep, shards: int) -> list[tuple[str, int]]:
    """(label, bytes) of stand-in corpus files, one per shard, for planning without the corpus:
    enough text for the largest budget within data.max_epochs."""
    largest = max(max(values) for values in (sweep.sweep.d1_tokens, sweep.sweep.d2_tokens, sweep.scratch_d_tokens))
    text = largest / sweep.data.max_epochs / (1 - sweep.corpus.val_fraction) * sweep.tokenizer.bytes_per_token
    return [(f"<corpus part {index + 1} of {shards}>", int(text / shards)) for index in range(shards)]


def _tokens_jobs(
    sweep: Sweep, name: str, corpus_mapping: dict, corpus: list | None, tokenizer: Job | None
) -> Iterator[Job]:
    """The tokens stage of one corpus as a scatter/gather (upcycling.data.tokens): the tokenizer (trained
    once, for the first corpus; ``tokenizer`` is that job for a second corpus), one job per corpus
    shard, the gather (meta.json, which training reads). The gather's spec carries ``tokens``: what
    the tokens are a function of (corpus files, settings, tokenizer), not how they were sharded."""
    from upcycling.data import tokens as layout  # numpy only

    mapping = sweep.mapping
    corpus_settings = {key: value for key, value in corpus_mapping.items() if key not in ("paths", "shards")}
    tokenizer_settings = {key: value for key, value in mapping["tokenizer"].items() if key not in TOKENIZER_ESTIMATES}
    count = corpus_mapping["shards"]
    if corpus is not None:
        from upcycling.data.corpus import estimated_text_bytes

        files = [(source.label, source.size) for source in corpus]
        paths = [input_path(source.path) for source in corpus]
        text_bytes = [estimated_text_bytes(source) for source in corpus]
    else:
        files, paths = _corpus_estimate(sweep, count), []
        text_bytes = [size for _, size in files]
    labels = [label for label, _ in files]
    costs = layout.tokenize_jobs(
        {**mapping, "corpus": corpus_mapping}, sweep.results_dir / name, labels, [size for _, size in files], text_bytes
    )
    if tokenizer is None:
        outputs = _outputs(sweep, "train_tokenizer", {})
        tokenizer = Job(
            "train_tokenizer",
            {},
            outputs,
            {f"file{index}": path for index, path in enumerate(paths)},
            _log(sweep, "train_tokenizer", {}),
            {
                "files": labels,
                "sizes": [size for _, size in files],
                "corpus": corpus_settings,
                "tokenizer": tokenizer_settings,
                "out": results_paths("train_tokenizer", {})["tokenizer"],
            },
            cost=costs[0],
        )
        yield tokenizer
    plan = layout.shard_plan([size for _, size in files], count)
    shards = []
    for index, members in enumerate(plan):
        wildcards = {"tokens": name, "shard": layout.shard_name(index, count)}
        outputs = _outputs(sweep, "tokenize_shard", wildcards)
        inputs = {"tokenizer": tokenizer.outputs["tokenizer"], **{f"file{i}": paths[i] for i in members if paths}}
        shard = Job(
            "tokenize_shard",
            wildcards,
            outputs,
            inputs,
            _log(sweep, "tokenize_shard", wildcards),
            {
                "files": [labels[i] for i in members],
                "sizes": [files[i][1] for i in members],
                "corpus": corpus_settings,
                "tokenizer_file": _in_results(tokenizer, "tokenizer"),
                "eot_token": sweep.tokenizer.eot_token,
                "out": _parent(results_paths("tokenize_shard", wildcards)["sidecar"]),
                "index": index,
                "count": count,
                "upstream": tokenizer.fingerprint,
            },
            cost=costs[index + 1],
        )
        shards.append(shard)
        yield shard
    wildcards = {"tokens": name}
    yield Job(
        "tokenize",
        wildcards,
        _outputs(sweep, "tokenize", wildcards),
        {
            "tokenizer": tokenizer.outputs["tokenizer"],
            **{f"shard{index}": shard.outputs["sidecar"] for index, shard in enumerate(shards)},
        },
        _log(sweep, "tokenize", wildcards),
        {
            "tokens_dir": _parent(results_paths("tokenize", wildcards)["meta"]),
            "plan": [[labels[i] for i in members] for members in plan],
            "corpus": corpus_settings,
            "tokenizer_file": _in_results(tokenizer, "tokenizer"),
            "tokens": fingerprint({"files": files, "corpus": corpus_settings, "tokenizer": tokenizer_settings}),
            "upstream": [shard.fingerprint for shard in shards],
        },
        cost=costs[-1],
    )


def _jobs(sweep: Sweep, corpora: dict[str, list | None]) -> Iterator[Job]:
    training = sweep.training
    gathers: dict[str, Job] = {}
    tokenizer = None
    for name in corpora:
        corpus_mapping = sweep.mapping["corpus"] if name == "tokens" else sweep.mapping["stage2"]["corpus"]
        for job in _tokens_jobs(sweep, name, corpus_mapping, corpora[name], tokenizer):
            yield job
            tokenizer = job if job.rule == "train_tokenizer" else tokenizer
            gathers[name] = job
    dense_exports: dict[tuple[str, int, int], Job] = {}
    metrics_jobs: list[Job] = []

    ordered = sorted(lineages(sweep), key=lambda lineage: ("dense", "upcycled", "scratch").index(lineage.family))
    for lineage in ordered:
        # Continued pretraining on a second corpus (the domain shift) reads its tokens.
        gather = gathers["tokens_stage2" if lineage.method == "continue" and "tokens_stage2" in gathers else "tokens"]
        meta, tokens_dir = gather.outputs["meta"], _mapping(gather)["tokens_dir"]
        tokens = _mapping(gather)["tokens"]
        origin = Origin({"meta": meta}, Fresh(), tokens)
        if lineage.family == "upcycled":
            dense = dense_exports[(lineage.size, lineage.seed, lineage.d1)]
            wildcards = lineage.wildcards
            outputs = _outputs(sweep, "transform", wildcards)
            options = options_for(sweep, lineage.experts, lineage.top_k, lineage.granularity, lineage.reinit_ratio)
            out = _parent(results_paths("transform", wildcards)["weights"])
            init = Job(
                "transform",
                wildcards,
                outputs,
                {"weights": dense.outputs["weights"], "hf_config": dense.outputs["hf_config"]},
                _log(sweep, "transform", wildcards),
                {
                    "method": lineage.method,
                    "options": options.to_dict(),
                    "dense": _parent(_in_results(dense, "weights")),
                    "out": out,
                    "seed": lineage.seed,
                    "copy_optimizer_state": sweep.moe.copy_optimizer_state and lineage.method == "moe_upcycle",
                    "upstream": dense.fingerprint,
                },
                lineage,
            )
            yield init
            origin = Origin({"meta": meta, "init": init.outputs["weights"]}, FromExport(out), init.fingerprint)

        stable_by_point: dict[int, Job] = {}
        previous = None
        for point in stable_points(sweep, lineage):
            rule = f"{lineage.family}_stable"
            wildcards = {**lineage.wildcards, "point": str(point)}
            outputs = _outputs(sweep, rule, wildcards)
            begin = _continuing(origin, previous)
            in_results = results_paths(rule, wildcards)
            partial = Path(in_results["checkpoint"] + ".partial")
            chain = Chain(begin, in_results, partial, tokens_dir, tokens)
            spec = train_spec(sweep, _label(rule, wildcards), lineage, "stable", point, chain)
            previous_point = int(previous.wildcards["point"]) if previous else 0
            job = Job(
                rule,
                wildcards,
                outputs,
                dict(begin.inputs),
                _log(sweep, rule, wildcards),
                spec,
                lineage,
                "stable",
                point - previous_point,
            )
            yield job
            stable_by_point[point] = previous = job

        for budget in lineage.budgets:
            rule = f"{lineage.family}_final"
            wildcards = {**lineage.wildcards, BUDGET_KEY[lineage.family]: str(budget)}
            outputs = _outputs(sweep, rule, wildcards)
            if training.wsd:
                begin = _continuing(origin, stable_by_point[training.decay_start(budget)])
                trained = budget - training.decay_start(budget)
            else:
                begin, trained = origin, budget
            partial = Path("checkpoints", lineage.name, f"{BUDGET_KEY[lineage.family]}_{budget}.partial")
            chain = Chain(begin, results_paths(rule, wildcards), partial, tokens_dir, tokens)
            spec = train_spec(sweep, _label(rule, wildcards), lineage, "final", budget, chain)
            job = Job(
                rule,
                wildcards,
                outputs,
                dict(begin.inputs),
                _log(sweep, rule, wildcards),
                spec,
                lineage,
                "final",
                trained,
            )
            yield job
            metrics_jobs.append(job)
            if lineage.family == "dense":
                dense_exports[(lineage.size, lineage.seed, budget)] = job

    runs = {_in_results(job, "metrics"): job.fingerprint for job in metrics_jobs}
    aggregate = Job(
        "aggregate",
        {},
        _outputs(sweep, "aggregate", {}),
        {f"run{index}": job.outputs["metrics"] for index, job in enumerate(metrics_jobs)},
        _log(sweep, "aggregate", {}),
        {"runs": runs, "config": result_config(sweep), "out": PATTERNS["aggregate"]["store"]},
    )
    yield aggregate
    fit = Job(
        "fit",
        {},
        _outputs(sweep, "fit", {}),
        {"store": aggregate.outputs["store"]},
        _log(sweep, "fit", {}),
        {"fit": dataclasses.asdict(sweep.fit)},
    )
    yield fit
    yield Job(
        "report",
        {},
        _outputs(sweep, "report", {}),
        {"store": aggregate.outputs["store"], "fits": fit.outputs["fits"]},
        _log(sweep, "report", {}),
    )


def result_config(sweep: Sweep) -> dict:
    """The sweep without what cannot change a result: the fit, the scheduler settings, where the
    results live, how the corpus is sharded for tokenizing, the tokenizer's runtime estimates, and
    how training jobs log and keep checkpoints."""
    config = {key: value for key, value in sweep.mapping.items() if key not in ("fit", "slurm", "results_dir")}
    config["tokenizer"] = {key: value for key, value in config["tokenizer"].items() if key not in TOKENIZER_ESTIMATES}
    config["corpus"] = _without_shards(config["corpus"])
    if isinstance(config.get("stage2"), Mapping) and config["stage2"].get("corpus"):
        config["stage2"] = {**config["stage2"], "corpus": _without_shards(config["stage2"]["corpus"])}
    config["training"] = {
        key: value for key, value in config["training"].items() if key in RESULT_TRAINING_KEYS or key == "seeds"
    }
    return config


def _without_shards(corpus: Mapping[str, Any]) -> dict:
    return {key: value for key, value in corpus.items() if key != "shards"}


class UnknownJob(InputError):
    """A job that the sweep does not have."""


class Inventory:
    """The jobs of one sweep, looked up the way Snakemake names them: rule and wildcards.

    ``base_dir``: where the corpus paths start. The corpus files found there give the tokens
    stage's real shard plan; without them (planning a sweep whose corpus is elsewhere) the tokens
    jobs are planned from an estimate of the text the sweep needs. ``corpora``: the files already
    found (upcycling.sweep.load.checked_corpora), instead of finding them from base_dir."""

    def __init__(self, sweep: Sweep, base_dir: str | Path | None = None, corpora: Mapping[str, list] | None = None):
        self.sweep = sweep
        self.corpora: dict[str, list | None] = dict(corpora) if corpora is not None else _corpora(sweep, base_dir)
        self.jobs = jobs(sweep, self.corpora)
        self._by_key = {(job.rule, _key(job.wildcards)): job for job in self.jobs}

    def find(self, rule: str, wildcards: Mapping[str, Any]) -> Job:
        try:
            return self._by_key[(rule, _key(wildcards))]
        except KeyError:
            names = ", ".join(f"{k}={v}" for k, v in wildcards.items() if not k.startswith("_"))
            raise UnknownJob(
                f"no {rule} job with {names} in this sweep: check the job's arguments against the "
                "config's sweep (upcycling plan --json lists every job)"
            ) from None

    def of_rule(self, rule: str) -> list[Job]:
        return [job for job in self.jobs if job.rule == rule]

    def targets(self) -> list[str]:
        """What `snakemake` builds by default: the store, the fits and the report."""
        return [
            *self.find("aggregate", {}).outputs.values(),
            *self.find("fit", {}).outputs.values(),
            *self.find("report", {}).outputs.values(),
        ]


def _corpora(sweep: Sweep, base_dir: str | Path | None) -> dict[str, list | None]:
    """Each token set's corpus files found from base_dir; None where there are none to find."""
    from upcycling.data.corpus import CorpusError, resolve_sources

    corpora: dict[str, list | None] = {}
    for name in token_sets(sweep):
        corpus = sweep.corpus if name == "tokens" else sweep.stage2.corpus
        if corpus is None:  # token_sets names the second only where stage2.corpus is set
            corpora[name] = None
            continue
        try:
            corpora[name] = resolve_sources(corpus.paths, base_dir) if base_dir is not None else None
        except CorpusError:
            corpora[name] = None
    return corpora


def _key(wildcards) -> tuple:
    """Snakemake's Wildcards (a named list) or a mapping -> a hashable, order-free key."""
    return tuple(sorted((str(k), str(v)) for k, v in wildcards.items() if not str(k).startswith("_")))
