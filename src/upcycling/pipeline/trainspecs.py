"""The spec of a training job (:class:`upcycling.core.spec.TrainSpec`), as a function of the sweep,
its lineage and where in the lineage the job sits. :mod:`upcycling.pipeline.jobs` chains the jobs;
this module says what each of them runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from upcycling.core.spec import Coords, FromCheckpoint, ModelShape, StartPoint, TrainingSettings, TrainSpec
from upcycling.model.flops import ModelConfig
from upcycling.pipeline.lineages import Lineage, lineage_model
from upcycling.sweep.models import model_config
from upcycling.sweep.settings import Sweep

# Training settings that change a result (the rest of the section is operational): the spec's.
RESULT_TRAINING_KEYS = tuple(field.name for field in dataclasses.fields(TrainingSettings))


@dataclass(frozen=True)
class Origin:
    """Where a training job starts: its inputs, its start point, the fingerprint of that start."""

    inputs: Mapping[str, str]
    start: StartPoint
    upstream: str

    def continued(self, checkpoint: str, in_results: str, upstream: str) -> Origin:
        """The origin of a job that continues the ``checkpoint`` (its path as an input; ``in_results``:
        relative to the results directory, as the spec names it) of the job whose fingerprint is
        ``upstream`` (it reads the same tokens)."""
        return Origin({"meta": self.inputs["meta"], "checkpoint": checkpoint}, FromCheckpoint(in_results), upstream)


@dataclass(frozen=True)
class Chain:
    """A training job's place: where it starts, what it writes, the tokens it reads (paths relative to
    the results directory)."""

    origin: Origin
    outputs: Mapping[str, str]
    partial: Path
    tokens_dir: str
    tokens: str  # the tokens' fingerprint


def training_settings(training) -> TrainingSettings:
    """The result-changing settings of a config's training section (sweep.settings.Training)."""
    return TrainingSettings(**{key: getattr(training, key) for key in RESULT_TRAINING_KEYS})


def model_fields(config: ModelConfig) -> dict:
    fields = dataclasses.asdict(config)
    fields.pop("vocab_size")  # known once the tokens exist; the trainer reads it from meta.json
    return fields


def train_spec(sweep: Sweep, label: str, lineage: Lineage, phase: str, end_tokens: int, chain: Chain) -> TrainSpec:
    """The spec of the job ``label`` of ``lineage`` that trains up to ``end_tokens`` in ``phase``."""
    training = sweep.training
    model = lineage_model(sweep, lineage)
    decay = coords = export = None
    if phase == "final":
        decay = (training.decay_start(end_tokens) if training.wsd else None, end_tokens)
        coords = Coords(
            size=lineage.size,
            init=lineage.family,
            method=lineage.method,
            seed=lineage.seed,
            d1_tokens=end_tokens if lineage.family == "dense" else lineage.d1,
            d2_tokens=0 if lineage.family == "dense" else end_tokens,
            experts=lineage.experts,
            top_k=lineage.top_k,
            granularity=lineage.granularity,
            reinit_ratio=lineage.reinit_ratio,
        )
        if lineage.family == "dense":
            export = str(Path(chain.outputs["weights"]).parent)
    dense = model_config(sweep, lineage.size, sweep.tokenizer.vocab_size)
    return TrainSpec(
        job=label,
        run_id=f"{lineage.name}/{Path(chain.partial.name).stem}",
        family=lineage.family,
        phase=phase,
        seed=lineage.seed,
        model=ModelShape(**model_fields(model)),
        dense_model=ModelShape(**model_fields(dense)),
        moe=dataclasses.asdict(sweep.moe) if model.is_moe else None,
        training=training_settings(training),
        # One process per GPU: the global batch is micro_batch_size x grad_accum_steps x processes.
        processes=max(sweep.slurm.gpus_per_job, 1),
        end_tokens=end_tokens,
        decay=decay,
        tokens_dir=chain.tokens_dir,
        tokens=chain.tokens,
        start=chain.origin.start,
        upstream=chain.origin.upstream,
        checkpoint=chain.outputs.get("checkpoint"),
        partial=str(chain.partial),
        metrics=chain.outputs.get("metrics"),
        export=export,
        export_adam_moments=export is not None and sweep.moe.copy_optimizer_state,
        coords=coords,
    )
