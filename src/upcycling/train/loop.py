"""The pieces of the one training loop of the pipeline, dense and MoE alike, on the DeepSpeed
engine: the engine, one optimizer step, an evaluation, the per-step losses kept on the device, the
stop signals. :class:`upcycling.train.trainer.Trainer` puts them together into a job.

A *job* (a :class:`~upcycling.core.spec.TrainSpec` of the job inventory) trains one model from its
start point (a fresh init, a portable export such as an upcycled MoE, or the checkpoint of the
previous job of its WSD chain) until its stage has seen exactly ``end_tokens`` tokens. A stable job
publishes its complete checkpoint as its output; a job that ends a run writes the run's metrics
(and the dense model's Hugging Face export) and deletes its checkpoint.

Resume: a job resumes its own in-progress checkpoint only when that checkpoint's fingerprint (the
spec, what it started from, the tokens, the process count) matches and it is not already complete;
otherwise it moves the checkpoint aside, says so, and trains from its start point, so a forced
rerun retrains and a changed setting never continues a stale run.

Preemption: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or a preemption), and SIGINT
(Ctrl-C in the terminal that runs it, or a snakemake stopped by Ctrl-C), make the job
save a checkpoint at the end of the current step and exit with EXIT_PREEMPTED; running the same
job again resumes from it. A NaN/inf loss stops the job with an error naming run and step; the loss
is read back from the device only at log, evaluation and checkpoint steps (so no step waits for
the GPU), and a checkpoint is never saved past a non-finite loss.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from upcycling.core.spec import TrainingSettings
from upcycling.model.transformer import Transformer
from upcycling.train import distributed

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


def use_bf16(precision: str) -> bool:
    """training.precision: bf16, fp32, or auto (bf16 where there is a GPU)."""
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def peak_flops() -> float | None:
    if "UPCYCLING_PEAK_FLOPS" in os.environ:
        return float(os.environ["UPCYCLING_PEAK_FLOPS"])
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    return None


def build_engine(model: Transformer, training: TrainingSettings | Mapping[str, Any], device: torch.device):
    """The DeepSpeed engine over the model with torch's AdamW. ``training``: a job's settings, or
    a mapping of the ones the engine reads (micro_batch_size, grad_accum_steps, lr, weight_decay,
    adam_betas, grad_clip, zero_stage, precision, compile: what calibrate and the benchmark pass).

    bf16 is DeepSpeed's ``torch_autocast``: the weights stay fp32 (they are the master copy), the
    forward and backward compute in bf16 under torch.autocast, and a fused AdamW steps the fp32
    parameters. Measured on an H100 (350M dense, README): the engine then costs 4.7% over the same
    loop in plain PyTorch, against 18.6% with DeepSpeed's bf16 optimizer (bf16 weights, fp32 masters
    inside the optimizer); and checkpoints, exports and the Adam-moment copy of upcycling see plain
    per-parameter fp32 state.
    """
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if isinstance(training, TrainingSettings):
        training = training.to_dict()

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
    if use_bf16(training["precision"]):
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


@torch.no_grad()
def expert_similarity(module: Transformer) -> list[float] | None:
    """Per MoE layer, the mean pairwise cosine similarity of its experts' weights (each expert's
    gate_up and down flattened into one vector); None for a dense model and for fewer than two
    experts (no pair to compare: E (E - 1) = 0 below). 1 for identical experts,
    as plain upcycling starts them; what training and Drop-Upcycling's re-draws move them from.

    The mean over pairs i != j of cos(w_i, w_j) is (|sum of the unit vectors|^2 - E) / (E (E - 1)),
    so with expert parallelism (a rank holds E / ep_size experts) one sum of the rank's unit
    vectors per layer, added over the expert-parallel group, gives it. One read-back at the end."""
    layers = module.moe_layers()
    experts, ep_size = module.cfg.experts, module.moe_options.ep_size
    if not layers or experts < 2:  # the same on every rank: no rank enters the collective below
        return None
    similarity = []
    for layer in layers:
        unit_sum = torch.zeros((), dtype=torch.float64)
        for expert in layer.experts:
            weights = torch.cat([weight.flatten() for weight in expert.parameters()]).double()  # gate_up, down
            unit_sum = unit_sum.to(weights.device) + torch.nn.functional.normalize(weights, dim=0)
        total = distributed.sum_over_expert_group(unit_sum, ep_size)
        similarity.append((total.square().sum() - experts) / (experts * (experts - 1)))
    return torch.stack(similarity).tolist()


class StopFlag:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag checked between steps (never mid-step): a Ctrl-C
    saves the checkpoint as a preemption does, instead of a KeyboardInterrupt that loses the steps."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    @staticmethod
    def release() -> None:
        """The steps are over: from here Slurm's warning (up to a minute early, as Slurm's docs say)
        or the limit's TERM finds nothing to save, and must not kill the process while it writes its
        outputs or exits. Python resets its own handlers to the default (which kills) as it shuts
        down, and a finished job killed then lost its outputs to Snakemake; an ignored signal stays
        ignored. SIGINT keeps its handler: a Ctrl-C at exit still ends the process."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)


def on_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device):
    if device.type != "cuda":
        return batch
    # Pinned host memory lets the copy run asynchronously while the GPU still works.
    return tuple(tensor.pin_memory().to(device, non_blocking=True) for tensor in batch)


def crossed(previous: int, now: int, every: int) -> bool:
    return now // every > previous // every


class LossBuffer:
    """Per-step losses kept on the device until a log, evaluation or checkpoint needs them; the
    values read back are appended to ``tokens`` and ``losses`` (the run's training curve)."""

    def __init__(self, run_id: str, tokens: list[int], losses: list[float]):
        self.run_id, self.tokens, self.losses = run_id, tokens, losses
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (step, tokens after it, loss)

    def add(self, step: int, tokens: int, loss: torch.Tensor) -> None:
        self.pending.append((step, tokens, loss))

    def flush(self) -> float | None:
        """Mean over ranks, read back once (a collective: every rank calls it at the same steps);
        TrainingDiverged at the first non-finite step."""
        if not self.pending:
            return self.losses[-1] if self.losses else None
        values = distributed.mean_over_ranks(torch.stack([loss for _, _, loss in self.pending])).tolist()
        for (step, tokens, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"run {self.run_id} diverged at step {step} ({tokens} tokens): loss is "
                    f"{value}; lower training.lr or raise training.warmup_tokens"
                )
            self.tokens.append(tokens)
            self.losses.append(value)
        self.pending = []
        return values[-1]
