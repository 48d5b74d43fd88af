"""The one training loop of the pipeline, dense and MoE alike, on the DeepSpeed engine.

A *job* (a spec of the job inventory, :mod:`upcycling.pipeline.jobs`) trains one model from its starting
point (a fresh init, a portable export such as an upcycled MoE, or the checkpoint of the previous
job of its WSD chain) until its stage has seen exactly ``end_tokens`` tokens. A stable job
publishes its complete checkpoint as its output; a job that ends a run writes the run's metrics
(and the dense model's Hugging Face export) and deletes its checkpoint.

Resume: a job resumes its own in-progress checkpoint only when that checkpoint's fingerprint (the
spec, what it started from, the tokens, the process count) matches and it is not already complete;
otherwise it moves the checkpoint aside, says so, and trains from its start point, so a forced
rerun retrains and a changed setting never continues a stale run.

Preemption: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or a preemption) makes the job
save a checkpoint at the end of the current step and exit with EXIT_PREEMPTED; running the same
job again resumes from it. A NaN/inf loss stops the job with an error naming run and step; the loss
is read back from the device only at log, evaluation and checkpoint steps (so no step waits for
the GPU), and a checkpoint is never saved past a non-finite loss.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from upcycling.core.fingerprint import fingerprint
from upcycling.core.metrics import FORMAT_VERSION, code_version, validate
from upcycling.core.publish import publish_json
from upcycling.data.windows import TokenWindows
from upcycling.model.export import CheckpointError, load_adam_moments, load_hf, save_hf
from upcycling.model.flops import ModelConfig, count_params, train_flops_per_token
from upcycling.model.transformer import MoEOptions, Transformer
from upcycling.train import checkpoint, distributed
from upcycling.train.schedule import Schedule

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; Slurm/Snakemake retry, the rerun resumes
# bf16 dense peak FLOP/s of GPUs we know, for the MFU estimate in the progress line.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


class TrainingDiverged(RuntimeError):
    pass


class Preempted(Exception):
    pass


@dataclass(frozen=True)
class RunOptions:
    """How a job runs, not what it computes (the rules pass these as resources: no rerun trigger)."""

    log_every_steps: int = 20
    checkpoint_every_tokens: int = 1 << 62
    keep_checkpoint: bool = False  # final jobs: keep the DeepSpeed checkpoint after the metrics


class Hook(Protocol):
    """Called after every optimizer step (tests install hooks that inject faults)."""

    def __call__(self, step: int, tokens: int, engine) -> None: ...


def use_bf16(training: dict) -> bool:
    precision = training["precision"]
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def peak_flops() -> float | None:
    if "UPCYCLING_PEAK_FLOPS" in os.environ:
        return float(os.environ["UPCYCLING_PEAK_FLOPS"])
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    return None


def build_engine(model: Transformer, training: dict, device: torch.device):
    """The DeepSpeed engine over the model with torch's AdamW.

    bf16 is DeepSpeed's ``torch_autocast``: the weights stay fp32 (they are the master copy), the
    forward and backward compute in bf16 under torch.autocast, and a fused AdamW steps the fp32
    parameters. Measured on an H100 (350M dense, README): the engine then costs 4.7% over the same
    loop in plain PyTorch, against 18.6% with DeepSpeed's bf16 optimizer (bf16 weights, fp32 masters
    inside the optimizer); and checkpoints, exports and the Adam-moment copy of upcycling see plain
    per-parameter fp32 state.
    """
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    # No weight decay on norms (1-D weights), as in Llama and nanoGPT.
    groups = [
        {
            "params": [p for p in model.parameters() if p.dim() >= 2],
            "weight_decay": training["weight_decay"],
            "name": "decay",
        },
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"},
    ]
    if model.cfg.is_moe:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    cuda = device.type == "cuda"
    model = model.to(device)
    # torch's AdamW, not DeepSpeed's fused Adam: no JIT build; fused kernels on CUDA, exact on CPU.
    optimizer = torch.optim.AdamW(groups, lr=training["lr"], betas=tuple(training["adam_betas"]), fused=cuda or None)
    if training["compile"]:
        model.compile()  # in place: parameter names (and so checkpoints and exports) are unchanged
    ds_config = {
        "train_micro_batch_size_per_gpu": training["micro_batch_size"],
        "gradient_accumulation_steps": training["grad_accum_steps"],
        "gradient_clipping": training["grad_clip"],
        "zero_optimization": {"stage": training["zero_stage"]},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if use_bf16(training):
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def train_step(engine, inputs: torch.Tensor, targets: torch.Tensor, micro: int, lr: float) -> torch.Tensor:
    """One optimizer step over the rank's rows (grad_accum micro-steps); the LM loss on the device."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=inputs.device)
    micro_steps = len(inputs) // micro
    for index in range(micro_steps):
        rows = slice(index * micro, (index + 1) * micro)
        _, lm_loss, moe_loss = engine(inputs[rows], targets[rows])
        engine.backward(lm_loss + moe_loss)
        engine.step()
        step_loss += lm_loss.detach() / micro_steps
    return step_loss


@torch.no_grad()
def evaluate(engine, inputs: torch.Tensor, targets: torch.Tensor, rows: int) -> tuple[float, list | None]:
    """Mean loss over the fixed held-out windows, and per-layer expert load (MoE)."""
    module: Transformer = engine.module
    device = next(module.parameters()).device
    engine.eval()
    loss_sum, count = torch.zeros((), device=device), 0
    moe_layers = module.moe_layers()
    expert_tokens = [torch.zeros(module.cfg.experts, device=device) for _ in moe_layers]
    for start in range(0, len(inputs), rows):
        batch_targets = targets[start : start + rows].to(device)
        _, lm_loss, _ = engine(inputs[start : start + rows].to(device), batch_targets)
        loss_sum += lm_loss.float() * batch_targets.numel()
        count += batch_targets.numel()
        for layer_index, layer in enumerate(moe_layers):
            expert_tokens[layer_index] += layer.expert_counts.float()
    engine.train()
    load = [(counts / counts.sum()).tolist() for counts in expert_tokens] if moe_layers else None
    return float(loss_sum) / count, load


class _StopFlag:
    """Turns SIGTERM/SIGUSR1 into a flag checked between steps (never mid-step)."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name


def _on_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device):
    if device.type != "cuda":
        return batch
    # Pinned host memory lets the copy run asynchronously while the GPU still works.
    return tuple(tensor.pin_memory().to(device, non_blocking=True) for tensor in batch)


def _crossed(previous: int, now: int, every: int) -> bool:
    return now // every > previous // every


class _Losses:
    """Per-step losses kept on the device until a log, evaluation or checkpoint needs them."""

    def __init__(self, run_id: str, curve: dict):
        self.run_id, self.curve = run_id, curve
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (step, tokens after it, loss)

    def add(self, step: int, tokens: int, loss: torch.Tensor) -> None:
        self.pending.append((step, tokens, loss))

    def flush(self) -> float | None:
        """Mean over ranks, read back once; TrainingDiverged at the first non-finite step."""
        if not self.pending:
            return self.curve["loss"][-1] if self.curve["loss"] else None
        values = distributed.mean_over_ranks(torch.stack([loss for _, _, loss in self.pending])).tolist()
        for (step, tokens, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"run {self.run_id} diverged at step {step} ({tokens} tokens): loss is "
                    f"{value}; lower training.lr or raise training.warmup_tokens"
                )
            self.curve["tokens"].append(tokens)
            self.curve["loss"].append(value)
        self.pending = []
        return values[-1]


def _start(engine, spec: dict, fingerprint_now: str, model_cfg: ModelConfig) -> dict:
    """Where the job starts: its own checkpoint (a resumed preemption) when it matches, else the
    chain's previous checkpoint, else the init export, else a fresh init. Returns the progress."""
    run_id, partial, start = spec["run_id"], Path(spec["partial"]), spec["start"]
    if partial.exists():
        manifest = checkpoint.read_manifest(partial) or {}
        reason = checkpoint.verified(partial)
        if reason is None and manifest.get("fingerprint") != fingerprint_now:
            reason = "it was made by other settings or from another start (its fingerprint differs)"
        if reason is None and manifest.get("complete"):
            reason = "it is already complete (a rerun trains again)"
        if reason is None:
            progress = checkpoint.restore(engine, partial)
            log.info("%s: resumed its own checkpoint at %d tokens", run_id, progress["tokens"])
            return progress
        aside = checkpoint.move_aside(partial, reason)
        log.warning(
            "%s: not resuming %s: %s; moved it to %s and training from the start point", run_id, partial, reason, aside
        )

    progress = {
        "tokens": 0,
        "step": 0,
        "curve": {"tokens": [], "val_loss": []},
        "train_curve": {"tokens": [], "loss": []},
        "wall_time_s": 0.0,
        "expert_load": None,
    }
    if "checkpoint" in start:
        upstream = Path(start["checkpoint"])
        reason = checkpoint.verified(upstream) if upstream.is_dir() else "it does not exist"
        if reason is not None:
            written_by = (checkpoint.read_manifest(upstream) or {}).get("written_by", "the job that writes it")
            if distributed.rank() == 0 and upstream.is_dir():
                shutil.rmtree(upstream, ignore_errors=True)  # so that Snakemake redoes that job
            raise CheckpointError(
                f"run {run_id}: the checkpoint it starts from, {upstream}, cannot be used: {reason}. It is written "
                f"by {written_by}; it has been removed, so rerunning snakemake (the same command) redoes that job "
                "and then this one"
            )
        progress = checkpoint.restore(engine, upstream)
        log.info("%s: continues %s from %d tokens", run_id, upstream, progress["tokens"])
    elif "export" in start:
        full, init_cfg, _ = load_hf(Path(start["export"]))
        if init_cfg != model_cfg:
            raise CheckpointError(
                f"run {run_id}: {start['export']} holds {init_cfg}, expected {model_cfg}: rerun the job that writes it"
            )
        engine.module.load_state_dict(checkpoint.local_state(full, engine.module), strict=True)
        moments = load_adam_moments(Path(start["export"]))
        if moments is not None:
            checkpoint.set_adam_moments(engine, moments, run_id)
            log.info("%s: optimizer starts from copied Adam moments (step %d)", run_id, moments[2])
    elif engine.module.moe_options.ep_size > 1:
        # Draw the whole MoE as one process would and keep this rank's experts: the initial
        # weights then do not depend on how the experts are spread over ranks.
        torch.manual_seed(spec["seed"])
        whole = Transformer(model_cfg, replace(engine.module.moe_options, ep_size=1)).state_dict()
        engine.module.load_state_dict(checkpoint.local_state(whole, engine.module), strict=True)
    return progress


def run(spec: dict, options: RunOptions = RunOptions(), hooks: tuple[Hook, ...] = ()) -> dict | None:
    """Train the job to its token budget. Returns the metrics (jobs that end a run) or None."""
    from upcycling.data.tokens import load_tokens

    device = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    run_id, training, end_tokens = spec["run_id"], spec["training"], spec["end_tokens"]
    torch.manual_seed(spec["seed"])

    train_tokens, val_tokens, meta = load_tokens(Path(spec["tokens_dir"]))
    model_cfg = ModelConfig(vocab_size=meta["vocab_size"], **spec["model"])
    windows = TokenWindows(train_tokens, model_cfg.seq_len)
    eval_inputs, eval_targets = TokenWindows(val_tokens, model_cfg.seq_len).eval_windows(training["eval_windows"])
    if world != spec["processes"]:
        log.warning(
            "%s: %d processes where the sweep plans %d: the global batch (micro_batch_size x "
            "grad_accum_steps x processes) differs from the one the sweep was planned with",
            run_id,
            world,
            spec["processes"],
        )
    micro, accum = training["micro_batch_size"], training["grad_accum_steps"]
    rows_per_rank = micro * accum
    global_rows, row_slice = rows_per_rank * world, slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    tokens_per_step = global_rows * model_cfg.seq_len

    engine = build_engine(Transformer(model_cfg, MoEOptions.from_settings(spec["moe"])), training, device)
    start_fingerprint = checkpoint.fingerprint_of_start(spec["start"])
    fingerprint_now = checkpoint.checkpoint_fingerprint(fingerprint(spec), start_fingerprint, meta, world)
    progress = _start(engine, spec, fingerprint_now, model_cfg)
    if progress["tokens"] > end_tokens:
        raise CheckpointError(
            f"run {run_id}: the starting checkpoint is already at {progress['tokens']} tokens, "
            f"past this job's end at {end_tokens}"
        )
    schedule = Schedule.of_job(training, spec["decay"])
    partial, written_by = Path(spec["partial"]), spec["job"]
    losses = _Losses(run_id, progress["train_curve"])
    stop = _StopFlag()
    tokens, step = progress["tokens"], progress["step"]
    job_start_tokens, job_start_time = tokens, time.perf_counter()
    wall_before_job = progress["wall_time_s"]  # this run's earlier jobs (a resumed or chained run)
    window_time, window_tokens = time.perf_counter(), 0
    flops_per_token, peak = train_flops_per_token(model_cfg), peak_flops()

    def save(complete: bool) -> None:
        losses.flush()  # never a checkpoint past a non-finite loss
        progress.update(
            tokens=tokens,
            step=step,
            torch_rng=torch.get_rng_state(),
            numpy_rng=np.random.get_state(),  # noqa: NPY002 (libraries draw from the global state)
            wall_time_s=wall_before_job + time.perf_counter() - job_start_time,
        )
        checkpoint.save(
            engine, partial, progress, fingerprint=fingerprint_now, complete=complete, written_by=written_by
        )

    def record_eval() -> None:
        val_loss, load = evaluate(engine, eval_inputs, eval_targets, micro)
        progress["curve"]["tokens"].append(tokens)
        progress["curve"]["val_loss"].append(val_loss)
        progress["expert_load"] = load
        if rank == 0:
            load_text = ""
            if load:
                load_text = " expert load " + " | ".join(" ".join(f"{x:.2f}" for x in layer) for layer in load)
            log.info("%s: eval at %d tokens: val_loss %.4f%s", run_id, tokens, val_loss, load_text)

    if tokens == 0:
        record_eval()
    while tokens < end_tokens:
        valid = min(tokens_per_step, end_tokens - tokens)
        inputs, targets = _on_device(
            windows.train_batch(
                spec["seed"], step, global_rows, row_slice, None if valid == tokens_per_step else valid
            ),
            device,
        )
        loss = train_step(engine, inputs, targets, micro, schedule.lr_at(tokens))
        previous, tokens, step = tokens, tokens + valid, step + 1
        window_tokens += valid
        losses.add(step, tokens, loss)
        for hook in hooks:
            hook(step, tokens, engine)

        if step % options.log_every_steps == 0:
            loss_value = losses.flush()
            if rank == 0:
                elapsed = time.perf_counter() - window_time
                tokens_per_s = window_tokens / max(elapsed, 1e-9)
                mfu = f"{flops_per_token * tokens_per_s / (peak * world):.1%}" if peak else "n/a (CPU)"
                memory = (
                    f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
                )
                log.info(
                    "%s: step %d tokens %d/%d (%.0f%%) loss %.4f lr %.2e | %.0f tok/s MFU %s ETA %.0fs%s",
                    run_id,
                    step,
                    tokens,
                    end_tokens,
                    100 * tokens / end_tokens,
                    loss_value,
                    schedule.lr_at(tokens),
                    tokens_per_s,
                    mfu,
                    (end_tokens - tokens) / max(tokens_per_s, 1e-9),
                    memory,
                )
            window_time, window_tokens = time.perf_counter(), 0
        if _crossed(previous, tokens, training["eval_every_tokens"]) and tokens < end_tokens:
            losses.flush()
            record_eval()
        if distributed.any_rank(stop.signal_name is not None):
            save(complete=False)
            log.warning(
                "%s: %s received: checkpoint saved at %d tokens; rerun the job to resume",
                run_id,
                stop.signal_name or "stop on another rank",
                tokens,
            )
            raise Preempted(run_id)
        if _crossed(previous, tokens, options.checkpoint_every_tokens) and tokens < end_tokens:
            save(complete=False)

    losses.flush()
    record_eval()
    job_seconds = time.perf_counter() - job_start_time
    if rank == 0:
        log.info(
            "%s: done, %d tokens in %.1fs (%.0f tok/s)",
            run_id,
            tokens - job_start_tokens,
            job_seconds,
            (tokens - job_start_tokens) / max(job_seconds, 1e-9),
        )
    if spec["checkpoint"] is not None:  # a stable job: its complete checkpoint is its output
        save(complete=True)
        checkpoint.publish(partial, Path(spec["checkpoint"]))
        return None
    progress["wall_time_s"] = wall_before_job + time.perf_counter() - job_start_time
    return _finish_run(engine, spec, options, progress, model_cfg, tokens, fingerprint_now, world, save)


def _finish_run(engine, spec, options, progress, model_cfg, tokens, fingerprint_now, world, save):
    """A run's end: the export (dense), the metrics, and its checkpoint deleted unless kept."""
    export = spec["export"]
    state = checkpoint.full_state(engine) if export is not None else None  # a collective: every rank
    # Only rank 0 writes the export; ZeRO 0 (the config requires it to copy moments) holds them whole on every rank.
    moments = (
        checkpoint.adam_moments(engine, spec["run_id"])
        if spec["export_adam_moments"] and distributed.rank() == 0
        else None
    )
    if options.keep_checkpoint:
        save(complete=True)
    metrics = None
    if distributed.rank() == 0:
        if export is not None:
            save_hf(state, model_cfg, Path(export), adam_moments=moments)
        metrics = run_metrics(spec, progress, model_cfg, tokens, fingerprint_now, world)
        publish_json(Path(spec["metrics"]), validate(metrics, f"the metrics of {spec['run_id']}"))
        partial = Path(spec["partial"])
        if not options.keep_checkpoint and partial.exists():
            shutil.rmtree(partial)
    distributed.barrier()
    return metrics


def run_metrics(
    spec: dict, progress: dict, model_cfg: ModelConfig, tokens: int, fingerprint_now: str, world: int
) -> dict:
    counts = count_params(model_cfg)
    dense = count_params(ModelConfig(vocab_size=model_cfg.vocab_size, **spec["dense_model"]))
    return {
        "format_version": FORMAT_VERSION,
        "run_id": spec["run_id"],
        "job": spec["job"],
        "coords": spec["coords"],
        "n_params": counts.total,
        "active_params": counts.active,
        "dense_params": dense.total,
        "non_embedding_params": counts.non_embedding,
        "active_non_embedding_params": counts.active_non_embedding,
        "dense_non_embedding_params": dense.non_embedding,
        "final_val_loss": progress["curve"]["val_loss"][-1],
        "tokens_seen": tokens,
        "flops": train_flops_per_token(model_cfg) * tokens,
        "wall_time_s": progress["wall_time_s"],
        "curve": progress["curve"],
        "train_curve": progress["train_curve"],
        "expert_load": progress["expert_load"],
        "model": asdict(model_cfg),
        "training": spec["training"],
        "moe": spec["moe"],
        "processes": world,
        "precision": "bf16" if use_bf16(spec["training"]) else "fp32",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "spec_sha256": fingerprint(spec),
        "checkpoint_fingerprint": fingerprint_now,
        "code_version": code_version(),
    }


def main_guarded(spec: dict, options: RunOptions, hooks: tuple[Hook, ...] = ()) -> int:
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
