"""`upcycling calibrate`: measure this node's training throughput per dense model size and write
it into the config's slurm section, so that job runtimes come from measured figures.

Run it on a node of the kind the sweep trains on: a GPU node measures one training process on one
GPU (bf16, as the trainer runs); a CPU node (slurm.gpus_per_job: 0) one process with
``slurm.cpu_threads`` threads. For each dense size the real engine (upcycling.train.loop.build_engine)
trains the dense model and the sweep's first MoE shape (with the sweep's ``moe`` settings, so its
``moe.dispatch``) on random tokens at the config's micro batch and sequence length;
``throughput_tokens_per_s`` gets the dense figures and ``moe_throughput_factor`` the median MoE/dense
ratio, which ``plan`` and the Slurm runtimes then use for every MoE job.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import time
from pathlib import Path

import yaml

from upcycling.core.errors import InputError
from upcycling.core.publish import publish_text
from upcycling.pipeline.trainspecs import training_settings
from upcycling.sweep.load import load_sweep, sweep_from_mapping
from upcycling.sweep.models import model_config
from upcycling.sweep.settings import Sweep

log = logging.getLogger(__name__)


def _tokens_per_s(sweep: Sweep, size: str, experts: int, top_k: int, steps: int, device) -> float:
    import torch

    from upcycling.model.transformer import MoEOptions, Transformer
    from upcycling.train.loop import build_engine, train_step

    training = training_settings(sweep.training)
    cfg = model_config(sweep, size, sweep.tokenizer.vocab_size, experts, top_k)
    torch.manual_seed(0)
    # One process here: expert parallelism (moe.ep_size) needs as many ranks, so the experts stay local.
    options = MoEOptions.from_settings({**sweep.mapping["moe"], "ep_size": 1})
    engine = build_engine(Transformer(cfg, options), training, device)
    rows, seq = sweep.training.micro_batch_size, sweep.data.seq_len
    batch = torch.randint(0, cfg.vocab_size, (rows, seq + 1), device=device)

    inputs, targets = batch[:, :-1], batch[:, 1:]
    micro_steps = sweep.training.grad_accum_steps  # one optimizer step, as the trainer takes it
    inputs, targets = inputs.repeat(micro_steps, 1), targets.repeat(micro_steps, 1)
    lr = sweep.training.lr
    for _ in range(2):  # warm-up: allocation, kernel selection, compilation
        train_step(engine, inputs, targets, rows, lr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(engine, inputs, targets, rows, lr)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * micro_steps * rows * seq / (time.perf_counter() - started)


def measure(sweep: Sweep, steps: int = 5) -> tuple[dict[str, float], float]:
    """(dense tokens/s per size, MoE/dense throughput ratio) of one training process here."""
    import torch

    from upcycling.train import distributed

    device = distributed.init()
    if device.type == "cpu":
        torch.set_num_threads(sweep.slurm.cpu_threads)
    experts, top_k = sweep.sweep.experts[0], sweep.sweep.top_k[0]
    dense, ratios = {}, []
    for size in sweep.dense_models:
        dense[size] = _tokens_per_s(sweep, size, 1, 1, steps, device)
        moe = _tokens_per_s(sweep, size, experts, top_k, steps, device)
        ratios.append(moe / dense[size])
        log.info("calibrate %s: dense %.0f tok/s, MoE E=%d k=%d %.0f tok/s", size, dense[size], experts, top_k, moe)
    return dense, statistics.median(ratios)


def write_into_config(path: Path, throughput: dict[str, float], moe_factor: float) -> str:
    """The config's text with slurm.throughput_tokens_per_s and slurm.moe_throughput_factor set
    (comments and the rest of the file kept); the keys are added to the slurm section if absent."""
    text = path.read_text()
    values = {
        "throughput_tokens_per_s": "{" + ", ".join(f"{size}: {rate:.0f}" for size, rate in throughput.items()) + "}",
        "moe_throughput_factor": f"{moe_factor:.2f}",
    }
    section = re.search(r"^slurm:[^\n]*\n((?:[ \t]+[^\n]*\n|\n)*)", text, re.M)
    if section is None:
        return text.rstrip("\n") + "\n\nslurm:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items())
    body = section.group(1)
    for key, value in values.items():
        # The key's line and, for a block-style value, the more deeply indented lines under it.
        pattern = re.compile(rf"^([ \t]+){key}:[^\n#]*(#[^\n]*)?\n(?:\1[ \t]+[^\n]*\n)*", re.M)
        if pattern.search(body):
            body = pattern.sub(
                lambda m, key=key, value=value: (
                    f"{m.group(1)}{key}: {value}" + (f"  {m.group(2)}" if m.group(2) else "") + "\n"
                ),
                body,
                count=1,
            )
        else:
            body = body.rstrip("\n") + f"\n  {key}: {value}\n"
    return text[: section.start(1)] + body + text[section.end(1) :]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/config.yaml", help="sweep config YAML (rewritten with --write)")
    parser.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--write", action="store_true", help="write the figures into the config file")


def run(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: the CLI's parser imports this module for its arguments

    sweep = load_sweep(args.config, base_dir=args.workdir, check_corpus=False)
    if torch.cuda.is_available() != bool(sweep.slurm.gpus_per_job):
        raise InputError(
            f"slurm.gpus_per_job is {sweep.slurm.gpus_per_job} but this node has "
            f"{'a' if torch.cuda.is_available() else 'no'} GPU: calibrate on a node of the kind the sweep "
            "trains on"
        )
    throughput, moe_factor = measure(sweep, args.steps)
    print(
        "slurm:\n  throughput_tokens_per_s: {"
        + ", ".join(f"{s}: {r:.0f}" for s, r in throughput.items())
        + f"}}\n  moe_throughput_factor: {moe_factor:.2f}"
    )
    if args.write:
        updated = write_into_config(Path(args.config), throughput, moe_factor)
        sweep_from_mapping(yaml.safe_load(updated), args.workdir, check_corpus=False)  # checked before it is written
        publish_text(args.config, updated)  # the user's own file: replaced whole or left untouched
        print(f"written into {args.config}")
    return 0
