"""The one training loop of the pipeline, dense and MoE alike, on the DeepSpeed engine.

A *job* trains one model from a starting point (fresh init, a portable init such as an upcycled
MoE, or the DeepSpeed checkpoint of the previous job in a WSD chain) until its stage has seen
exactly ``end_tokens`` tokens. The learning rate is a pure function of the tokens seen, so a chain
of jobs (stable to D_1, stable to D_2, ...) is the same run as one long job, and each decay job
branches from a stable checkpoint. A job that ends a run writes the run's metrics JSON (and, if
asked, a Hugging Face export) atomically.

Preemption: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or a preemption) makes the
job save a checkpoint at the end of the current step and exit with EXIT_PREEMPTED; running the
same job again resumes from it. A NaN/inf loss stops the job with an error naming run and step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import write_text_atomic
from .data import TokenWindows
from .export import load_adam_moments, load_hf, save_hf
from .flops import ModelConfig, ParamCounts, count_params, train_flops_per_token
from .model import MoEOptions, Transformer

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; Slurm/Snakemake retry, the rerun resumes
FAULT_SIGNAL_AT_STEP = "UPCYCLING_FAULT_SIGNAL_AT_STEP"  # failure injection for tests
FAULT_NAN_AT_STEP = "UPCYCLING_FAULT_NAN_AT_STEP"
CLIENT_KEY = "upcycling_train_state"
# bf16 dense peak FLOP/s of GPUs we know, for the MFU estimate in the progress line.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


class TrainingDiverged(RuntimeError):
    pass


class Preempted(Exception):
    pass


@dataclass(frozen=True)
class Schedule:
    """Learning rate as a pure function of the tokens seen in this stage."""

    peak_lr: float
    warmup_tokens: int
    min_lr_ratio: float
    kind: str  # "wsd" | "cosine"
    decay_start: int | None  # WSD: where the decay begins (None: a stable job, no decay)
    decay_end: int | None  # WSD and cosine: the run's total tokens D

    def lr_at(self, tokens: int) -> float:
        if self.warmup_tokens and tokens < self.warmup_tokens:
            return self.peak_lr * (tokens + 1) / self.warmup_tokens
        min_lr = self.peak_lr * self.min_lr_ratio
        if self.kind == "cosine":
            span = max(self.decay_end - self.warmup_tokens, 1)
            progress = min(max(tokens - self.warmup_tokens, 0) / span, 1.0)
            return min_lr + (self.peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.decay_start is None or tokens < self.decay_start:
            return self.peak_lr
        progress = min((tokens - self.decay_start) / max(self.decay_end - self.decay_start, 1), 1.0)
        return self.peak_lr + (min_lr - self.peak_lr) * progress  # linear decay to min_lr


@dataclass
class TrainJob:
    run_id: str
    model: ModelConfig
    moe: MoEOptions
    tokens_dir: Path
    checkpoint_dir: Path  # this job's DeepSpeed checkpoints (kept out of Snakemake's outputs)
    end_tokens: int
    schedule: Schedule
    seed: int
    training: dict  # the config's `training` section
    resume_from: Path | None = None  # previous job's checkpoint dir in a chain
    init_weights: Path | None = None  # portable (HF) export to start from, e.g. an upcycled MoE
    state_out: Path | None = None  # small JSON marker: where this job's checkpoint is
    metrics_out: Path | None = None  # the run's metrics JSON (jobs that end a run)
    export_out: Path | None = None  # HF export of the final weights
    coords: dict = field(default_factory=dict)
    dense_counts: ParamCounts | None = None  # N1 of the dense model a run comes from
    export_adam_moments: bool = False  # write the Adam moments beside the export (for upcycling)


# ----------------------------------------------------------------------------- distributed


def init_distributed(backend: str | None = None) -> None:
    """Single process without a launcher: fill in the env that torch.distributed wants."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if not torch.distributed.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def use_bf16(training: dict) -> bool:
    precision = training.get("precision", "auto")
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def peak_flops() -> float | None:
    if "UPCYCLING_PEAK_FLOPS" in os.environ:
        return float(os.environ["UPCYCLING_PEAK_FLOPS"])
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    return None


# ----------------------------------------------------------------------------- engine


def build_engine(model: Transformer, training: dict):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    # No weight decay on norms (1-D weights), as in Llama and nanoGPT.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": training["weight_decay"], "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if model.cfg.is_moe:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # torch's AdamW, not DeepSpeed's fused Adam: no JIT build, and exact on CPU.
    optimizer = torch.optim.AdamW(groups, lr=training["lr"], betas=tuple(training["adam_betas"]),
                                  foreach=torch.cuda.is_available())
    ds_config = {
        "train_micro_batch_size_per_gpu": training["micro_batch_size"],
        "gradient_accumulation_steps": training["grad_accum_steps"],
        "gradient_clipping": training["grad_clip"],
        "zero_optimization": {"stage": training["zero_stage"]},
        "bf16": {"enabled": use_bf16(training)},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if torch.cuda.is_available():
        model = model.cuda()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def local_state_from_full(full: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """Select this rank's experts from a full (all experts) state dict when ep_size > 1."""
    cfg, ep_size = model.cfg, model.moe_options.ep_size
    if not cfg.is_moe or ep_size == 1:
        return full
    from deepspeed.utils import groups

    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep_size}")
    local_experts = cfg.experts // ep_size
    local: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        marker = ".experts.deepspeed_experts."
        if marker in name:
            head, tail = name.split(marker)
            expert, rest = tail.split(".", 1)
            global_expert = int(expert)
            if global_expert // local_experts != ep_rank:
                continue
            name = f"{head}{marker}{global_expert % local_experts}.{rest}"
        local[name] = tensor
    return local


def full_state(engine) -> dict[str, torch.Tensor]:
    """All experts on every rank (gathered over the expert-parallel group), in fp32 on CPU."""
    module: Transformer = engine.module
    state = {name: tensor.detach().float().cpu() for name, tensor in module.state_dict().items()}
    ep_size = module.moe_options.ep_size
    if not module.cfg.is_moe or ep_size == 1:
        return state
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    local_experts = module.cfg.experts // ep_size
    marker = ".experts.deepspeed_experts."
    gathered: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if marker not in name:
            gathered[name] = tensor
            continue
        parts = [torch.empty_like(tensor) for _ in range(ep_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        head, tail = name.split(marker)
        local_index, rest = tail.split(".", 1)
        for ep_rank, part in enumerate(parts):
            gathered[f"{head}{marker}{ep_rank * local_experts + int(local_index)}.{rest}"] = part
    return gathered


def _per_parameter_adam(engine, run_id: str) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    params = set(engine.module.parameters())
    held = {p for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
    if not isinstance(optimizer, torch.optim.Optimizer) or held != params:
        raise ValueError(f"run {run_id}: Adam moments can be copied only with training.zero_stage 0 and "
                         "fp32 training (training.precision: fp32), where the optimizer keeps them per "
                         "parameter; set moe.copy_optimizer_state to false otherwise")
    return optimizer


def adam_moments(engine, run_id: str) -> tuple[dict, dict, int]:
    """This (dense, unsharded) model's Adam moments by parameter name, and the step count."""
    optimizer = _per_parameter_adam(engine, run_id)
    exp_avg, exp_avg_sq, step = {}, {}, 0
    for name, param in engine.module.named_parameters():
        state = optimizer.state[param]
        exp_avg[name], exp_avg_sq[name] = state["exp_avg"].detach().cpu(), state["exp_avg_sq"].detach().cpu()
        step = int(state["step"])
    return exp_avg, exp_avg_sq, step


def set_adam_moments(engine, moments: tuple[dict, dict, int], run_id: str) -> None:
    """Start the optimizer from copied moments (upcycling with moe.copy_optimizer_state)."""
    optimizer = _per_parameter_adam(engine, run_id)
    exp_avg, exp_avg_sq = (local_state_from_full(m, engine.module) for m in moments[:2])
    for name, param in engine.module.named_parameters():
        optimizer.state[param] = {"step": torch.tensor(float(moments[2])),
                                  "exp_avg": exp_avg[name].to(param.device).clone(),
                                  "exp_avg_sq": exp_avg_sq[name].to(param.device).clone()}
    log.info("%s: optimizer starts from copied Adam moments (step %d)", run_id, moments[2])


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(engine, eval_inputs: torch.Tensor, eval_targets: torch.Tensor, batch_rows: int,
             ) -> tuple[float, list[list[float]] | None]:
    """Mean loss over the fixed held-out windows, and per-layer expert load (MoE)."""
    module: Transformer = engine.module
    device = next(module.parameters()).device
    engine.eval()
    loss_sum, count = 0.0, 0
    moe_layers = module.moe_layers()
    expert_tokens = [torch.zeros(module.cfg.experts) for _ in moe_layers]
    for start in range(0, len(eval_inputs), batch_rows):
        inputs = eval_inputs[start:start + batch_rows].to(device)
        targets = eval_targets[start:start + batch_rows].to(device)
        _, lm_loss, _ = engine(inputs, targets)
        loss_sum += lm_loss.float().item() * targets.numel()
        count += targets.numel()
        for layer_index, layer in enumerate(moe_layers):
            expert_tokens[layer_index] += layer.expert_counts.float().cpu()
    engine.train()
    load = [(counts / counts.sum()).tolist() for counts in expert_tokens] if moe_layers else None
    return loss_sum / count, load


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(engine, job: TrainJob, client_state: dict) -> None:
    """Save under a new tag, then drop older tags: one complete checkpoint always exists."""
    tag = f"tokens{client_state['tokens']}"
    # Under one key of ours: DeepSpeed returns its own metadata keys in the same dict on load.
    engine.save_checkpoint(str(job.checkpoint_dir), tag=tag, client_state={CLIENT_KEY: client_state})
    if torch.distributed.get_rank() == 0:
        for old in job.checkpoint_dir.glob("tokens*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()


def _has_checkpoint(directory: Path | None) -> bool:
    return directory is not None and (directory / "latest").is_file()


def _restore(engine, directory: Path) -> dict:
    _, saved = engine.load_checkpoint(str(directory), load_module_strict=True)
    if not saved or CLIENT_KEY not in saved:
        raise RuntimeError(f"checkpoint {directory} has no training state of ours: delete it and rerun the job")
    client_state = saved[CLIENT_KEY]
    torch.set_rng_state(client_state["torch_rng"])
    np.random.set_state(client_state["numpy_rng"])
    return client_state


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1))


# ----------------------------------------------------------------------------- the loop


class _StopFlag:
    """Turns SIGTERM/SIGUSR1 into a flag checked between steps (never mid-step)."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


def run(job: TrainJob) -> dict | None:
    """Train the job to its token budget. Returns the metrics (jobs that end a run) or None."""
    from .tokenize import load_tokens

    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    training = job.training
    device = device_for_rank()
    torch.manual_seed(job.seed)

    train_tokens, val_tokens, meta = load_tokens(job.tokens_dir)
    if meta["vocab_size"] != job.model.vocab_size:
        raise ValueError(f"run {job.run_id}: tokens in {job.tokens_dir} have vocab {meta['vocab_size']}, "
                         f"the model {job.model.vocab_size}: retokenize or fix the model config")
    train_windows = TokenWindows(train_tokens, job.model.seq_len)
    eval_inputs, eval_targets = TokenWindows(val_tokens, job.model.seq_len).eval_windows(training["eval_windows"])

    micro, accum = training["micro_batch_size"], training["grad_accum_steps"]
    global_rows = micro * accum * world
    tokens_per_step = global_rows * job.model.seq_len

    model = Transformer(job.model, job.moe)
    engine = build_engine(model, training)
    if not _has_checkpoint(job.checkpoint_dir):
        full = None
        if job.init_weights is not None:
            full, init_cfg, _ = load_hf(job.init_weights)
            if init_cfg != job.model:
                raise ValueError(f"run {job.run_id}: {job.init_weights} holds {init_cfg}, expected {job.model}")
        elif job.moe.ep_size > 1:
            # Draw the whole MoE as one process would and keep this rank's experts: the
            # initial weights then do not depend on how the experts are spread over ranks.
            torch.manual_seed(job.seed)
            full = Transformer(job.model, dataclasses.replace(job.moe, ep_size=1)).state_dict()
        if full is not None:
            engine.module.load_state_dict(local_state_from_full(full, engine.module), strict=True)
        moments = load_adam_moments(job.init_weights) if job.init_weights is not None else None
        if moments is not None:
            set_adam_moments(engine, moments, job.run_id)

    # Where to start: this job's own checkpoint (a resumed preemption) > the chain's previous job.
    client_state = {"tokens": 0, "step": 0, "curve": {"tokens": [], "val_loss": []},
                    "train_curve": {"tokens": [], "loss": []}, "wall_time_s": 0.0, "expert_load": None}
    if _has_checkpoint(job.checkpoint_dir):
        client_state = _restore(engine, job.checkpoint_dir)
        log.info("%s: resumed its own checkpoint at %d tokens", job.run_id, client_state["tokens"])
    elif job.resume_from is not None:
        if not _has_checkpoint(job.resume_from):
            raise FileNotFoundError(f"run {job.run_id}: no checkpoint in {job.resume_from}: rerun the job that writes it")
        client_state = _restore(engine, job.resume_from)
        log.info("%s: continues %s from %d tokens", job.run_id, job.resume_from, client_state["tokens"])
    if client_state["tokens"] > job.end_tokens:
        raise ValueError(f"run {job.run_id}: the starting checkpoint is already at {client_state['tokens']} "
                         f"tokens, past this job's end at {job.end_tokens}")

    flops_per_token = train_flops_per_token(job.model)
    peak = peak_flops()
    stop = _StopFlag()
    fault_signal_step = int(os.environ.get(FAULT_SIGNAL_AT_STEP, -1))
    fault_nan_step = int(os.environ.get(FAULT_NAN_AT_STEP, -1))
    eval_every = training["eval_every_tokens"]
    ckpt_every = training["checkpoint_every_tokens"]
    tokens, step = client_state["tokens"], client_state["step"]
    job_start_tokens, job_start_time = tokens, time.perf_counter()
    window_time, window_tokens = time.perf_counter(), 0
    rows_per_rank = micro * accum
    row_slice = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)

    def checkpoint_state() -> dict:
        client_state.update(tokens=tokens, step=step, torch_rng=torch.get_rng_state(),
                            numpy_rng=np.random.get_state(),
                            wall_time_s=client_state["wall_time_s"] + time.perf_counter() - job_start_time)
        return client_state

    def record_eval() -> None:
        val_loss, load = evaluate(engine, eval_inputs, eval_targets, micro)
        client_state["curve"]["tokens"].append(tokens)
        client_state["curve"]["val_loss"].append(val_loss)
        client_state["expert_load"] = load
        if rank == 0:
            load_text = ""
            if load:
                load_text = " expert load " + " | ".join(" ".join(f"{x:.2f}" for x in layer) for layer in load)
            log.info("%s: eval at %d tokens: val_loss %.4f%s", job.run_id, tokens, val_loss, load_text)

    if tokens == 0:
        record_eval()
    while tokens < job.end_tokens:
        valid = min(tokens_per_step, job.end_tokens - tokens)
        lr = job.schedule.lr_at(tokens)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = train_windows.train_batch(job.seed, step, global_rows, row_slice,
                                                    None if valid == tokens_per_step else valid)
        step_loss = torch.zeros((), device=device)
        for micro_index in range(accum):
            rows = slice(micro_index * micro, (micro_index + 1) * micro)
            _, lm_loss, moe_loss = engine(inputs[rows].to(device), targets[rows].to(device))
            if step == fault_nan_step:
                lm_loss = lm_loss * float("nan")
            loss = lm_loss + moe_loss
            engine.backward(loss)
            engine.step()
            step_loss += lm_loss.detach() / accum
        torch.distributed.all_reduce(step_loss)
        step_loss_value = step_loss.item() / world
        if not math.isfinite(step_loss_value):
            raise TrainingDiverged(f"run {job.run_id} diverged at step {step} ({tokens} tokens): loss is "
                                   f"{step_loss_value}; lower training.lr or raise warmup_tokens")
        previous_tokens = tokens
        tokens += valid
        step += 1
        window_tokens += valid
        client_state["train_curve"]["tokens"].append(tokens)
        client_state["train_curve"]["loss"].append(step_loss_value)

        if step == fault_signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        if step % training["log_every_steps"] == 0 and rank == 0:
            elapsed = time.perf_counter() - window_time
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            eta = (job.end_tokens - tokens) / max(tokens_per_s, 1e-9)
            mfu = f"{flops_per_token * tokens_per_s / (peak * world):.1%}" if peak else "n/a (CPU)"
            log.info("%s: step %d tokens %d/%d (%.0f%%) loss %.4f lr %.2e | %.0f tok/s MFU %s ETA %.0fs",
                     job.run_id, step, tokens, job.end_tokens, 100 * tokens / job.end_tokens, step_loss_value,
                     lr, tokens_per_s, mfu, eta)
            window_time, window_tokens = time.perf_counter(), 0
        if tokens // eval_every > previous_tokens // eval_every and tokens < job.end_tokens:
            record_eval()

        stop_now = torch.tensor([1.0 if stop.signal_name else 0.0])
        torch.distributed.all_reduce(stop_now, op=torch.distributed.ReduceOp.MAX)
        if stop_now.item() > 0:
            _save_checkpoint(engine, job, checkpoint_state())
            log.warning("%s: %s received: checkpoint saved at %d tokens; rerun the job to resume",
                        job.run_id, stop.signal_name or "stop", tokens)
            raise Preempted(job.run_id)
        if tokens // ckpt_every > previous_tokens // ckpt_every and tokens < job.end_tokens:
            _save_checkpoint(engine, job, checkpoint_state())

    record_eval()
    _save_checkpoint(engine, job, checkpoint_state())
    job_seconds = time.perf_counter() - job_start_time
    if rank == 0:
        log.info("%s: done, %d tokens in %.1fs (%.0f tok/s)", job.run_id, tokens, job_seconds,
                 (tokens - job_start_tokens) / max(job_seconds, 1e-9))

    metrics = None
    final_state = full_state(engine) if (job.export_out or job.metrics_out) else None
    if rank == 0:
        if job.export_out is not None:
            moments = adam_moments(engine, job.run_id) if job.export_adam_moments else None
            save_hf(final_state, job.model, job.export_out, adam_moments=moments)
        if job.metrics_out is not None:
            metrics = run_metrics(job, client_state, tokens)
            write_json_atomic(job.metrics_out, metrics)
        if job.state_out is not None:
            # The marker a chain's next job reads; it carries the loss curve beside the checkpoint.
            write_json_atomic(job.state_out, {"run_id": job.run_id, "tokens": tokens, "step": step,
                                              "checkpoint_dir": str(job.checkpoint_dir),
                                              "curve": client_state["curve"]})
    torch.distributed.barrier()
    return metrics


def run_metrics(job: TrainJob, client_state: dict, tokens: int) -> dict:
    counts = count_params(job.model)
    curve = client_state["curve"]
    return {
        "format_version": 1,
        "run_id": job.run_id,
        "coords": job.coords,
        "n_params": counts.total,
        "active_params": counts.active,
        "dense_params": (job.dense_counts or counts).total,
        "dense_non_embedding_params": (job.dense_counts or counts).non_embedding,
        "non_embedding_params": counts.non_embedding,
        "active_non_embedding_params": counts.active_non_embedding,
        "final_val_loss": curve["val_loss"][-1],
        "tokens_seen": tokens,
        "flops": train_flops_per_token(job.model) * tokens,
        "wall_time_s": client_state["wall_time_s"],
        "curve": curve,
        "train_curve": client_state["train_curve"],
        "expert_load": client_state["expert_load"],
        "model": asdict(job.model),
        "training": job.training,
        "code_version": code_version(),
    }


def code_version() -> str:
    """Package version plus the git commit, when the code runs from a checkout."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+git{commit}" if commit else __version__


def main_guarded(job: TrainJob) -> int:
    """Run a job and map its outcome to an exit code (for the CLI)."""
    try:
        run(job)
    except Preempted:
        return EXIT_PREEMPTED
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return 3
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.stdout.flush()
    return 0
