"""A training job as one object: :class:`Trainer` (after torchtitan's trainer) builds the engine
from a :class:`~upcycling.core.spec.TrainSpec`, starts it from its start point, and trains to
the job's end with :meth:`~Trainer.step`, :meth:`~Trainer.evaluate`, :meth:`~Trainer.checkpoint`,
:meth:`~Trainer.log_progress` and :meth:`~Trainer.finish`. Its state (tokens, steps, curves) lives
on the trainer, and :meth:`~Trainer.progress` is its frozen snapshot, what a checkpoint keeps.
The pieces it puts together are in :mod:`upcycling.train.loop`, which says how a job resumes,
stops on a signal and refuses a diverged loss.

Every rank runs the same sequence of collectives: the loss read-back (log, evaluation and
checkpoint steps), the stop check (every step but the last, a host tensor), the saves and the export.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from upcycling.core.metrics import FORMAT_VERSION, code_version, validate
from upcycling.core.publish import publish_json
from upcycling.core.spec import REBUILD, Fresh, FromCheckpoint, FromExport, Progress, SpecError, TrainSpec
from upcycling.data.windows import TokenWindows
from upcycling.model.export import CheckpointError, load_adam_moments, load_hf, save_hf
from upcycling.model.flops import ModelConfig, count_params, train_flops_per_token
from upcycling.model.transformer import MoEOptions, Transformer
from upcycling.train import checkpoint as checkpoints
from upcycling.train import distributed, loop
from upcycling.train.loop import EXIT_PREEMPTED, Hook, LossBuffer, Preempted, RunOptions, StopFlag, TrainingDiverged
from upcycling.train.schedule import Schedule

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "Trainer", "main_guarded", "run", "run_metrics"]


def model_config(spec: TrainSpec, vocab_size: int) -> ModelConfig:
    """The job's model: its spec's shape and the tokens' vocabulary."""
    return ModelConfig(vocab_size=vocab_size, **asdict(spec.model))


def begin(engine, spec: TrainSpec, fingerprint_now: str, model_cfg: ModelConfig) -> Progress:
    """Where the job starts: its own checkpoint (a resumed preemption) when it matches, else its
    start point: the chain's previous checkpoint, the init export, or a fresh init. Returns the
    progress it starts with."""
    partial = Path(spec.partial)
    if partial.exists():
        manifest = checkpoints.read_manifest(partial) or {}
        reason = checkpoints.verified(partial)
        if reason is None and manifest.get("fingerprint") != fingerprint_now:
            reason = "it was made by other settings or from another start (its fingerprint differs)"
        if reason is None and manifest.get("complete"):
            reason = "it is already complete (a rerun trains again)"
        if reason is None:
            progress = checkpoints.restore(engine, partial)
            log.info("%s: resumed its own checkpoint at %d tokens", spec.run_id, progress.tokens)
            return progress
        aside = checkpoints.move_aside(partial, reason)
        log.warning(
            "%s: not resuming %s: %s; moved it to %s and training from the start point",
            spec.run_id,
            partial,
            reason,
            aside,
        )
    start = spec.start
    if isinstance(start, FromCheckpoint):
        return _continue(engine, spec.run_id, Path(start.path))
    if isinstance(start, FromExport):
        _load_export(engine, spec.run_id, Path(start.path), model_cfg)
    elif isinstance(start, Fresh) and engine.module.moe_options.ep_size > 1:
        # Draw the whole MoE as one process would and keep this rank's experts: the initial
        # weights then do not depend on how the experts are spread over ranks.
        torch.manual_seed(spec.seed)
        whole = Transformer(model_cfg, replace(engine.module.moe_options, ep_size=1)).state_dict()
        engine.module.load_state_dict(checkpoints.local_state(whole, engine.module), strict=True)
    return Progress()


def _continue(engine, run_id: str, upstream: Path) -> Progress:
    """Restore the checkpoint a job starts from; a broken one is removed so Snakemake redoes it."""
    reason = checkpoints.verified(upstream) if upstream.is_dir() else "it does not exist"
    if reason is not None:
        written_by = (checkpoints.read_manifest(upstream) or {}).get("written_by", "the job that writes it")
        if distributed.rank() == 0 and upstream.is_dir():
            shutil.rmtree(upstream, ignore_errors=True)  # so that Snakemake redoes that job
        raise CheckpointError(
            f"run {run_id}: the checkpoint it starts from, {upstream}, cannot be used: {reason}. It is written "
            f"by {written_by}; it has been removed, so rerunning snakemake (the same command) redoes that job "
            "and then this one"
        )
    progress = checkpoints.restore(engine, upstream)
    log.info("%s: continues %s from %d tokens", run_id, upstream, progress.tokens)
    return progress


def _load_export(engine, run_id: str, export: Path, model_cfg: ModelConfig) -> None:
    """The export's weights (every rank keeps its experts) and its Adam moments, where it has them."""
    full, init_cfg, _ = load_hf(export)
    if init_cfg != model_cfg:
        raise CheckpointError(
            f"run {run_id}: {export} holds {init_cfg}, expected {model_cfg}: rerun the job that writes it"
        )
    engine.module.load_state_dict(checkpoints.local_state(full, engine.module), strict=True)
    moments = load_adam_moments(export)
    if moments is not None:
        checkpoints.set_adam_moments(engine, moments, run_id)
        log.info("%s: optimizer starts from copied Adam moments (step %d)", run_id, moments[2])


class Trainer:
    """One training job, from its spec to its checkpoint (a stable job) or its metrics (a run's end).

    ``Trainer(spec).train()`` is the whole job; :func:`run` does just that. Constructing it joins
    the process group, reads the tokens, builds the engine and starts it from its start point.
    """

    def __init__(self, spec: TrainSpec, options: RunOptions | None = None, hooks: tuple[Hook, ...] = ()):
        from upcycling.data.tokens import load_tokens  # numpy only; not the tokenizer

        if (spec.checkpoint is None) == (spec.metrics is None):
            raise SpecError(
                f"the spec of {spec.job} names {'both' if spec.metrics else 'neither'} of 'checkpoint' (a stable "
                f"job's output) and 'metrics' (a run's end), where a training job writes exactly one: {REBUILD}"
            )
        self.spec, self.options, self.hooks = spec, options or RunOptions(), hooks
        self.device = distributed.init()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        training = spec.training
        torch.manual_seed(spec.seed)

        train_tokens, val_tokens, meta = load_tokens(Path(spec.tokens_dir))
        self.model_cfg = model_config(spec, meta["vocab_size"])
        self.windows = TokenWindows(train_tokens, self.model_cfg.seq_len)
        self.eval_inputs, self.eval_targets = TokenWindows(val_tokens, self.model_cfg.seq_len).eval_windows(
            training.eval_windows
        )
        if self.world != spec.processes:
            log.warning(
                "%s: %d processes where the sweep plans %d: the global batch (micro_batch_size x "
                "grad_accum_steps x processes) differs from the one the sweep was planned with",
                spec.run_id,
                self.world,
                spec.processes,
            )
        self.micro = training.micro_batch_size
        rows_per_rank = self.micro * training.grad_accum_steps
        self.global_rows = rows_per_rank * self.world
        self.row_slice = slice(self.rank * rows_per_rank, (self.rank + 1) * rows_per_rank)
        self.tokens_per_step = self.global_rows * self.model_cfg.seq_len

        model = Transformer(self.model_cfg, MoEOptions.from_settings(None if spec.moe is None else dict(spec.moe)))
        self.engine = loop.build_engine(model, training, self.device)
        start_fingerprint = checkpoints.fingerprint_of_start(spec.start)
        self.fingerprint = checkpoints.checkpoint_fingerprint(spec.fingerprint, start_fingerprint, meta, self.world)
        progress = begin(self.engine, spec, self.fingerprint, self.model_cfg)
        if progress.tokens > spec.end_tokens:
            raise CheckpointError(
                f"run {spec.run_id}: the starting checkpoint is already at {progress.tokens} tokens, "
                f"past this job's end at {spec.end_tokens}"
            )
        self.tokens, self.step_count = progress.tokens, progress.step
        self.eval_tokens, self.val_loss = list(progress.eval_tokens), list(progress.val_loss)
        self.train_tokens, self.train_loss = list(progress.train_tokens), list(progress.train_loss)
        self.expert_load = progress.expert_load
        self.wall_before_job = progress.wall_time_s  # this run's earlier jobs (a resumed or chained run)

        self.schedule = Schedule.of_job(training, spec.decay)
        self.losses = LossBuffer(spec.run_id, self.train_tokens, self.train_loss)
        self.stop = StopFlag()
        self.flops_per_token, self.peak = train_flops_per_token(self.model_cfg), loop.peak_flops()
        self.job_start_tokens, self.job_start_time = self.tokens, time.perf_counter()
        self.window_time, self.window_tokens = time.perf_counter(), 0

    # ------------------------------------------------------------------------- the job

    def train(self) -> dict | None:
        """Train to the job's end. Returns the metrics (a job that ends a run) or None."""
        if self.tokens == 0:
            self.evaluate()
        while self.tokens < self.spec.end_tokens:
            self.step()
        return self.finish()

    def step(self) -> None:
        """One optimizer step, then what falls due after it: a progress line, an evaluation, a
        save on a stop signal (Preempted), a periodic checkpoint."""
        spec, options = self.spec, self.options
        end = spec.end_tokens
        valid = min(self.tokens_per_step, end - self.tokens)
        batch = self.windows.train_batch(
            spec.seed,
            self.step_count,
            self.global_rows,
            self.row_slice,
            None if valid == self.tokens_per_step else valid,
        )
        inputs, targets = loop.on_device(batch, self.device)
        loss = loop.train_step(self.engine, inputs, targets, self.micro, self.schedule.lr_at(self.tokens))
        previous = self.tokens
        self.tokens, self.step_count = self.tokens + valid, self.step_count + 1
        self.window_tokens += valid
        self.losses.add(self.step_count, self.tokens, loss)
        for hook in self.hooks:
            hook(self.step_count, self.tokens, self.engine)

        if self.step_count % options.log_every_steps == 0:
            self.log_progress()
        if loop.crossed(previous, self.tokens, spec.training.eval_every_tokens) and self.tokens < end:
            self.losses.flush()
            self.evaluate()
        # At the last step a stop signal finishes the job: that costs less than a save and a rerun.
        if self.tokens < end and distributed.any_rank(self.stop.signal_name is not None):
            self.checkpoint(complete=False)
            log.warning(
                "%s: %s received: checkpoint saved at %d tokens; rerun the job to resume",
                spec.run_id,
                self.stop.signal_name or "stop on another rank",
                self.tokens,
            )
            self.stop.release()  # saved: a second signal (the limit's TERM after USR1) must not kill the exit
            raise Preempted(spec.run_id)
        if loop.crossed(previous, self.tokens, options.checkpoint_every_tokens) and self.tokens < end:
            self.checkpoint(complete=False)

    def evaluate(self) -> None:
        """The held-out loss (and MoE expert load) now, recorded on the curve."""
        val_loss, load = loop.evaluate(self.engine, self.eval_inputs, self.eval_targets, self.micro)
        self.eval_tokens.append(self.tokens)
        self.val_loss.append(val_loss)
        self.expert_load = None if load is None else tuple(tuple(layer) for layer in load)
        if self.rank == 0:
            load_text = ""
            if load:
                load_text = " expert load " + " | ".join(" ".join(f"{x:.2f}" for x in layer) for layer in load)
            log.info("%s: eval at %d tokens: val_loss %.4f%s", self.spec.run_id, self.tokens, val_loss, load_text)

    def progress(self) -> Progress:
        """How far the run has come, now (its wall time counts this job so far)."""
        return Progress(
            tokens=self.tokens,
            step=self.step_count,
            eval_tokens=tuple(self.eval_tokens),
            val_loss=tuple(self.val_loss),
            train_tokens=tuple(self.train_tokens),
            train_loss=tuple(self.train_loss),
            wall_time_s=self.wall_before_job + time.perf_counter() - self.job_start_time,
            expert_load=self.expert_load,
        )

    def checkpoint(self, complete: bool) -> None:
        """Save the job's in-progress checkpoint (every rank), never past a non-finite loss."""
        self.losses.flush()
        checkpoints.save(
            self.engine,
            Path(self.spec.partial),
            self.progress(),
            fingerprint=self.fingerprint,
            complete=complete,
            written_by=self.spec.job,
        )

    def log_progress(self) -> None:
        """The progress line (rank 0): loss, learning rate, throughput, MFU, ETA, peak memory."""
        loss_value = self.losses.flush()  # a collective: every rank
        if self.rank == 0:
            end = self.spec.end_tokens
            elapsed = time.perf_counter() - self.window_time
            tokens_per_s = self.window_tokens / max(elapsed, 1e-9)
            peak = self.peak
            mfu = f"{self.flops_per_token * tokens_per_s / (peak * self.world):.1%}" if peak else "n/a (CPU)"
            memory = ""
            if self.device.type == "cuda":
                memory = f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            log.info(
                "%s: step %d tokens %d/%d (%.0f%%) loss %.4f lr %.2e | %.0f tok/s MFU %s ETA %.0fs%s",
                self.spec.run_id,
                self.step_count,
                self.tokens,
                end,
                100 * self.tokens / end,
                loss_value,
                self.schedule.lr_at(self.tokens),
                tokens_per_s,
                mfu,
                (end - self.tokens) / max(tokens_per_s, 1e-9),
                memory,
            )
        self.window_time, self.window_tokens = time.perf_counter(), 0

    def finish(self) -> dict | None:
        """The job's end: the last evaluation; a stable job publishes its complete checkpoint, a
        run's end writes the export (dense), the metrics, and deletes its checkpoint unless kept."""
        spec = self.spec
        self.stop.release()
        self.losses.flush()
        self.evaluate()
        job_seconds = time.perf_counter() - self.job_start_time
        if self.rank == 0:
            trained = self.tokens - self.job_start_tokens
            log.info(
                "%s: done, %d tokens in %.1fs (%.0f tok/s)",
                spec.run_id,
                trained,
                job_seconds,
                trained / max(job_seconds, 1e-9),
            )
        if spec.checkpoint is not None:  # a stable job: its complete checkpoint is its output
            self.checkpoint(complete=True)
            checkpoints.publish(Path(spec.partial), Path(spec.checkpoint))
            return None
        metrics_path = Path(spec.metrics or "")  # set: __init__ checked it
        progress = self.progress()
        state = checkpoints.full_state(self.engine) if spec.export is not None else None  # a collective
        similarity = loop.expert_similarity(self.engine.module)  # a collective with expert parallelism
        # Only rank 0 writes the export; ZeRO 0 (the config requires it to copy moments) holds them whole on every rank.
        moments = None
        if spec.export_adam_moments and self.rank == 0:
            moments = checkpoints.adam_moments(self.engine, spec.run_id)
        if self.options.keep_checkpoint:
            self.checkpoint(complete=True)
        metrics = None
        if self.rank == 0:
            if spec.export is not None and state is not None:
                save_hf(state, self.model_cfg, Path(spec.export), adam_moments=moments)
            metrics = run_metrics(spec, progress, self.model_cfg, self.fingerprint, self.world, similarity)
            publish_json(metrics_path, validate(metrics, f"the metrics of {spec.run_id}"))
            partial = Path(spec.partial)
            if not self.options.keep_checkpoint and partial.exists():
                shutil.rmtree(partial)
        distributed.barrier()
        return metrics


def run_metrics(
    spec: TrainSpec,
    progress: Progress,
    model_cfg: ModelConfig,
    fingerprint_now: str,
    world: int,
    expert_similarity: list[float] | None = None,
) -> dict:
    """The metrics record of a run that ends (upcycling.core.metrics' contract). ``expert_similarity``:
    per MoE layer, the experts' mean pairwise cosine similarity at the end (loop.expert_similarity)."""
    counts = count_params(model_cfg)
    dense = count_params(ModelConfig(vocab_size=model_cfg.vocab_size, **asdict(spec.dense_model)))
    plain, curves = spec.to_dict(), progress.to_dict()
    return {
        "format_version": FORMAT_VERSION,
        "run_id": spec.run_id,
        "job": spec.job,
        "coords": plain["coords"],
        "n_params": counts.total,
        "active_params": counts.active,
        "dense_params": dense.total,
        "non_embedding_params": counts.non_embedding,
        "active_non_embedding_params": counts.active_non_embedding,
        "dense_non_embedding_params": dense.non_embedding,
        "final_val_loss": progress.val_loss[-1],
        "tokens_seen": progress.tokens,
        "flops": train_flops_per_token(model_cfg) * progress.tokens,
        "wall_time_s": progress.wall_time_s,
        "curve": curves["curve"],
        "train_curve": curves["train_curve"],
        "expert_load": curves["expert_load"],
        "expert_similarity": expert_similarity,
        "model": asdict(model_cfg),
        "training": plain["training"],
        "moe": plain["moe"],
        "processes": world,
        "precision": "bf16" if loop.use_bf16(spec.training.precision) else "fp32",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "spec_sha256": spec.fingerprint,
        "checkpoint_fingerprint": fingerprint_now,
        "code_version": code_version(),
    }


def run(spec: TrainSpec, options: RunOptions | None = None, hooks: tuple[Hook, ...] = ()) -> dict | None:
    """Train the job to its token budget. Returns the metrics (jobs that end a run) or None."""
    return Trainer(spec, options, hooks).train()


def main_guarded(spec: TrainSpec, options: RunOptions, hooks: tuple[Hook, ...] = ()) -> int:
    """Run a job and map its outcome to an exit code (for the CLI)."""
    try:
        run(spec, options, hooks)
    except Preempted:
        return EXIT_PREEMPTED
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return 3
    finally:
        distributed.shutdown()
    return 0
