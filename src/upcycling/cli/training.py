"""The torch stages' commands: train (one training job) and transform (a second-stage initial export)."""

from __future__ import annotations

import dataclasses
import importlib
import os

from upcycling.cli.common import inventory_of, job_spec, log, results_root
from upcycling.core.errors import InputError


def _hooks() -> tuple:
    """Hooks named in UPCYCLING_HOOKS ('module:factory,...'; the tests' fault injection)."""
    hooks = []
    for entry in filter(None, os.environ.get("UPCYCLING_HOOKS", "").split(",")):
        module, _, factory = entry.partition(":")
        hooks.append(getattr(importlib.import_module(module), factory)())
    return tuple(hooks)


def cmd_train(args) -> int:
    from upcycling.cluster.launch import apply_slurm_env
    from upcycling.core.spec import TrainSpec
    from upcycling.pipeline import jobargs

    apply_slurm_env()  # under srun: RANK/WORLD_SIZE/... from the Slurm environment
    # The spec first (a bad one is refused before torch is imported), then the trainer.
    if args.spec:
        spec, settings = TrainSpec.from_json(job_spec(args, "")), None  # SpecError (exit 2) naming the bad keys
    else:
        try:
            rule, wildcards = jobargs.job_key(args)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        inventory = inventory_of(args)
        spec, settings = inventory.find(rule, wildcards).train_spec, inventory.sweep.training

    from upcycling.train.loop import RunOptions
    from upcycling.train.trainer import main_guarded

    options = RunOptions()
    if settings is not None:
        options = RunOptions(
            settings.log_every_steps, settings.checkpoint_every_tokens, settings.keep_final_checkpoints
        )
    overrides = {
        key: value
        for key, value in (
            ("log_every_steps", args.log_every_steps),
            ("checkpoint_every_tokens", args.checkpoint_every_tokens),
            ("keep_checkpoint", args.keep_checkpoint or None),
        )
        if value is not None
    }
    options = dataclasses.replace(options, **overrides)
    _log_attempt(spec.run_id)
    # The spec's paths start at the results directory (a spec is the same wherever the results
    # live): the trainer runs there, and reads and writes them as the spec spells them.
    os.chdir(results_root(args))
    return main_guarded(spec, options, _hooks())


def _log_attempt(run_id: str) -> None:
    """A header per attempt: the log is appended to, so every attempt's story stays in it."""
    import socket
    import time

    slurm = os.environ.get("SLURM_JOB_ID")
    where = f"Slurm job {slurm} (restart {os.environ.get('SLURM_RESTART_COUNT', 0)})" if slurm else "no Slurm job"
    log.info(
        "==== %s: attempt on %s, %s, pid %d, started %s ====",
        run_id,
        socket.gethostname(),
        where,
        os.getpid(),
        time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def cmd_transform(args) -> int:
    """A second-stage method's initial export from the dense export at D1 (upcycling.transform.methods)."""
    from upcycling.model.export import load_adam_moments, load_hf, save_hf
    from upcycling.transform.grow import transform
    from upcycling.transform.methods import Stage2Options, describe
    from upcycling.transform.upcycle import upcycle_adam_moments

    spec = job_spec(
        args, "transform", {"size": args.size, "seed": str(args.seed), "d1": str(args.d1), "variant": args.variant}
    )
    results = results_root(args)  # where the spec's paths start
    method, options, dense_dir = spec["method"], Stage2Options(**spec["options"]), results / spec["dense"]
    dense_state, dense_cfg, _ = load_hf(dense_dir)
    try:
        state, stage2_cfg = transform(dense_state, dense_cfg, method, options, seed=spec["seed"])
    except ValueError as exc:  # a method or options that cannot make this model
        raise InputError(f"{method} from {dense_dir}: {exc}") from None
    moments = None
    if spec["copy_optimizer_state"]:
        dense_moments = load_adam_moments(dense_dir)
        if dense_moments is None:
            raise InputError(
                f"config key 'moe.copy_optimizer_state': {dense_dir} holds no Adam moments "
                "(optimizer.safetensors): rerun the dense stage with this config, or set it to false"
            )
        moved = upcycle_adam_moments(*dense_moments[:2], stage2_cfg, options.reinit_ratio, spec["seed"])
        moments = (*moved, dense_moments[2])
    out = results / spec["out"]
    save_hf(
        state,
        stage2_cfg,
        out,
        adam_moments=moments,
        extra={**describe(method, options), "transformed_from": spec["dense"], "seed": spec["seed"]},
    )
    log.info(
        "%s: %s -> %s (%d layers, %d heads x %d, FFN %d, %d experts top-%d)",
        method,
        dense_dir,
        out,
        stage2_cfg.n_layers,
        stage2_cfg.n_heads,
        stage2_cfg.head_dim,
        stage2_cfg.ffn_hidden,
        stage2_cfg.experts,
        stage2_cfg.top_k,
    )
    return 0
