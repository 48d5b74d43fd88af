"""DeepSpeed checkpoints of training jobs: save, restore, integrity and provenance; and moving
weights and Adam moments between the engine and our full (every expert, fp32, host) state.

A checkpoint directory holds DeepSpeed's files under a tag (``tokens<N>``) and ``manifest.json``:
the checkpoint's fingerprint (what produced it: the job's spec, the checkpoint or export it started
from, the tokens, the number of processes), its token count, whether it is complete (the job's
end), the job that writes it, and the size and sha256 of every file. A checkpoint is saved under a
new tag and its manifest replaced atomically before older tags are removed, so one verifiable
checkpoint exists at all times; DeepSpeed's own ``latest`` file is not trusted.

Every collective here is issued by every rank in the same order; the hashing and the file
housekeeping happen on rank 0 between barriers (a shared file system is assumed, as on every
cluster that runs multi-node DeepSpeed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from upcycling.core.errors import storage_error
from upcycling.core.fingerprint import fingerprint
from upcycling.core.publish import publish_dir, publish_json, sha256_file
from upcycling.core.spec import FromCheckpoint, FromExport, Progress, SpecError, StartPoint
from upcycling.model.export import CheckpointError
from upcycling.model.flops import CHECKPOINT_BYTES_PER_PARAM
from upcycling.model.transformer import Transformer, join_expert_name, split_expert_name
from upcycling.train import distributed

CLIENT_KEY = "upcycling_train_state"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- integrity


def _hash_files(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file under root (relative paths), hashed in parallel threads."""
    paths = sorted(path for path in root.rglob("*") if path.is_file())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, paths))
    return {
        path.relative_to(root.parent).as_posix(): {"bytes": path.stat().st_size, "sha256": digest}
        for path, digest in zip(paths, digests)
    }


def read_manifest(directory: Path) -> dict | None:
    """The manifest, or None where there is none (or it cannot be parsed)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "files" in manifest else None


def problem(directory: Path) -> str | None:
    """Why the checkpoint in ``directory`` cannot be trusted, or None when every file matches."""
    manifest = read_manifest(directory)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable"
    for name, recorded in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != recorded["bytes"]:
            return f"{name} has {size} bytes, the manifest records {recorded['bytes']}"
        if sha256_file(path) != recorded["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def verified(directory: Path) -> str | None:
    """:func:`problem`, checked on rank 0 and agreed on by every rank."""
    found = problem(directory) if distributed.rank() == 0 else None
    if distributed.any_rank(found is not None):
        return found or "rank 0 found it corrupt"
    return None


def fingerprint_of_start(start: StartPoint) -> str:
    """What a job starts from, as a fingerprint: the checkpoint's or the export's, or 'fresh'."""
    if isinstance(start, FromCheckpoint):
        return (read_manifest(Path(start.path)) or {}).get("fingerprint", "missing")
    if isinstance(start, FromExport):
        config = json.loads((Path(start.path) / "config.json").read_text())
        return config.get("upcycling", {}).get("weights_sha256", "unrecorded")
    return "fresh"


def checkpoint_fingerprint(spec_fingerprint: str, start_fingerprint: str, tokens_meta: dict, processes: int) -> str:
    return fingerprint(
        [
            spec_fingerprint,
            start_fingerprint,
            tokens_meta.get("corpus_sha256"),
            tokens_meta.get("tokenizer_sha256"),
            processes,
        ]
    )


# ----------------------------------------------------------------------------- save and restore


def save(engine, directory: Path, progress: Progress, *, fingerprint: str, complete: bool, written_by: str) -> None:
    """Save under a new tag, publish the manifest, then drop older tags. The client state is the
    progress's JSON and the random number generators' states as they are now."""
    directory = Path(directory)
    tag = f"tokens{progress.tokens}"
    client_state = {
        **progress.to_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),  # noqa: NPY002 (libraries draw from the global state)
    }
    try:
        # Under one key of ours: DeepSpeed returns its own metadata keys in the same dict on load.
        engine.save_checkpoint(str(directory), tag=tag, client_state={CLIENT_KEY: client_state})
        distributed.barrier()
        if distributed.rank() == 0:
            publish_json(
                directory / MANIFEST,
                {
                    "fingerprint": fingerprint,
                    "tag": tag,
                    "tokens": progress.tokens,
                    "complete": complete,
                    "written_by": written_by,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "files": _hash_files(directory / tag),
                },
            )
    except (OSError, RuntimeError) as exc:
        # A full or read-only disk: drop the new tag's partial files (the manifest still names the
        # previous checkpoint, which stays whole) and say which disk and how much it needs.
        error = storage_error(exc, directory, needed=_checkpoint_bytes(engine, directory), what="the checkpoint")
        if error is None:
            raise
        shutil.rmtree(directory / tag, ignore_errors=True)
        raise error from None
    if distributed.rank() == 0:
        for old in directory.glob("tokens*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _checkpoint_bytes(engine, directory: Path) -> int:
    """About the disk one checkpoint of this engine takes: the last one's files where the manifest
    lists them, else the module's weights plus fp32 Adam state (master weights and two moments)."""
    recorded = sum(entry["bytes"] for entry in (read_manifest(directory) or {}).get("files", {}).values())
    params = list(engine.module.parameters())
    precision = "fp32" if all(p.element_size() == 4 for p in params) else "bf16"
    return max(recorded, sum(p.numel() for p in params) * CHECKPOINT_BYTES_PER_PARAM[precision])


def restore(engine, directory: Path) -> Progress:
    """Load the checkpoint the manifest names; returns its progress (RNG states restored)."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise CheckpointError(f"checkpoint {directory} has no readable {MANIFEST}: rerun the job that writes it")
    try:
        _, saved = engine.load_checkpoint(str(directory), tag=manifest["tag"], load_module_strict=True)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if not saved or CLIENT_KEY not in saved:
        raise CheckpointError(
            f"checkpoint {directory} holds no training state of ours: it was not written by "
            "upcycling train; delete it and rerun the job that writes it"
        )
    state = dict(saved[CLIENT_KEY])
    torch_rng, numpy_rng = state.pop("torch_rng", None), state.pop("numpy_rng", None)
    try:
        progress = Progress.from_dict(state, f"the training state in checkpoint {directory}")
    except SpecError as exc:
        raise CheckpointError(f"{exc}; delete it and rerun the job that writes it") from None
    if torch_rng is None or numpy_rng is None:
        raise CheckpointError(
            f"checkpoint {directory} holds no random number generator states: delete it and rerun the job that writes it"
        )
    torch.set_rng_state(torch_rng)
    np.random.set_state(numpy_rng)  # noqa: NPY002 (libraries draw from the global state)
    return progress


def move_aside(directory: Path, reason: str) -> Path:
    """Rename a checkpoint that must not be resumed out of the way (``upcycling clean`` deletes it)."""
    aside = directory.with_name(f"{directory.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    if distributed.rank() == 0:
        os.replace(directory, aside)
    distributed.barrier()
    return aside


def publish(partial: Path, final: Path) -> None:
    """A stable job's complete checkpoint becomes its declared output (one rename)."""
    if distributed.rank() == 0:
        publish_dir(partial, final)
    distributed.barrier()


# ----------------------------------------------------------------------------- full state <-> engine


def full_state(engine) -> dict[str, torch.Tensor]:
    """Every weight in fp32 on the host, all experts on every rank.

    With bf16 training the fp32 master weights (DeepSpeed's optimizer holds them) are exported,
    not the bf16 copies the module computes with; ``safe_get_full_fp32_param`` is a collective over
    each parameter's data-parallel group. Experts split over an expert-parallel group are gathered
    on the device (NCCL on GPU), then moved to the host.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module: Transformer = engine.module
    local = {}
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param)
        local[name] = (master if master is not None else param.detach()).float()
    ep_size = module.moe_options.ep_size
    if not module.cfg.is_moe or ep_size == 1:
        return {name: tensor.cpu() for name, tensor in local.items()}
    group, _ = distributed.expert_parallel_group(ep_size)
    local_experts = module.cfg.experts // ep_size
    state: dict[str, torch.Tensor] = {}
    for name, tensor in local.items():
        parts = split_expert_name(name)
        if parts is None:
            state[name] = tensor.cpu()
            continue
        prefix, local_index, leaf = parts
        gathered = [torch.empty_like(tensor) for _ in range(ep_size)]
        torch.distributed.all_gather(gathered, tensor.contiguous(), group=group)
        for ep_rank, part in enumerate(gathered):
            state[join_expert_name(prefix, ep_rank * local_experts + local_index, leaf)] = part.cpu()
    return state


def local_state(full: dict[str, torch.Tensor], module: Transformer) -> dict[str, torch.Tensor]:
    """This rank's part of a full (every expert) state dict: its experts when ep_size > 1."""
    cfg, ep_size = module.cfg, module.moe_options.ep_size
    if not cfg.is_moe or ep_size == 1:
        return full
    _, ep_rank = distributed.expert_parallel_group(ep_size)
    local_experts = cfg.experts // ep_size
    local: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        parts = split_expert_name(name)
        if parts is not None:
            prefix, expert, leaf = parts
            if expert // local_experts != ep_rank:
                continue
            name = join_expert_name(prefix, expert % local_experts, leaf)
        local[name] = tensor
    return local


def _per_parameter_adam(engine, run_id: str) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    params = set(engine.module.parameters())
    held = {p for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
    if not isinstance(optimizer, torch.optim.Optimizer) or held != params:
        raise CheckpointError(
            f"run {run_id}: Adam moments can be copied only with training.zero_stage 0 and fp32 "
            "training (training.precision: fp32), where the optimizer keeps them per parameter; "
            "set moe.copy_optimizer_state to false otherwise"
        )
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
    exp_avg, exp_avg_sq = (local_state(m, engine.module) for m in moments[:2])
    for name, param in engine.module.named_parameters():
        optimizer.state[param] = {
            "step": torch.tensor(float(moments[2])),
            "exp_avg": exp_avg[name].to(param.device).clone(),
            "exp_avg_sq": exp_avg_sq[name].to(param.device).clone(),
        }
