"""The sweep config as one typed, frozen object.

The YAML is read once, checked against the JSON schema (which holds every default: there are no
defaults in this module) and by the semantic checks in :mod:`upcycling.sweep.load`, then turned into
the frozen dataclasses below. Everything downstream (the job inventory, resources, the plan, the
CLI) reads attributes of :class:`Sweep`, never ``.get(key, default)`` on dicts.

``Sweep.mapping`` keeps the validated mapping itself: it is what gets written (the store's
``config`` attribute) and hashed.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycling.core.errors import InputError


@dataclass(frozen=True)
class Corpus:
    paths: tuple[str, ...]
    text_field: str
    val_fraction: float
    split_seed: int
    shards: int
    select: Mapping[str, Any]


@dataclass(frozen=True)
class TokenizerSettings:
    vocab_size: int
    path: str | None
    min_frequency: int
    eot_token: str
    sample_bytes: int
    threads: int
    tokens_per_s_per_core: float
    bytes_per_token: float


@dataclass(frozen=True)
class Data:
    seq_len: int
    max_epochs: float


@dataclass(frozen=True)
class DenseModel:
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    rope_theta: float


@dataclass(frozen=True)
class Training:
    micro_batch_size: int
    grad_accum_steps: int
    lr: float
    min_lr_ratio: float
    warmup_tokens: int
    schedule: str
    decay_fraction: float
    weight_decay: float
    adam_betas: tuple[float, float]
    grad_clip: float
    eval_every_tokens: int
    eval_windows: int
    checkpoint_every_tokens: int
    log_every_steps: int
    zero_stage: int
    precision: str
    compile: bool
    seeds: tuple[int, ...]
    keep_final_checkpoints: bool
    keep_stable_checkpoints: bool

    @property
    def wsd(self) -> bool:
        return self.schedule == "wsd"

    def decay_start(self, budget: int) -> int:
        """WSD: the token count where the run of budget D leaves the stable phase."""
        return int(budget * (1 - self.decay_fraction))


@dataclass(frozen=True)
class ModelConfigAxis:
    """Extra upcycled runs for the model-configuration law: other expert counts / top-k at one
    (D1, D2) pair, for every dense size."""

    experts: tuple[int, ...]
    top_k: tuple[int, ...]
    d1_tokens: int
    d2_tokens: int


@dataclass(frozen=True)
class Axes:
    d1_tokens: tuple[int, ...]
    d2_tokens: tuple[int, ...]
    experts: tuple[int, ...]
    top_k: tuple[int, ...]
    granularity: tuple[int, ...]
    reinit_ratio: tuple[float, ...]  # Drop-Upcycling's r per upcycled MoE lineage (0: plain sparse upcycling)
    model_config: ModelConfigAxis | None


@dataclass(frozen=True)
class MoESettings:
    aux_loss_coef: float
    z_loss_coef: float
    capacity_factor: float
    drop_tokens: bool
    ep_size: int
    router_init_std: float
    copy_optimizer_state: bool
    dispatch: str | None


@dataclass(frozen=True)
class Baselines:
    dense: bool
    scratch_moe: bool
    scratch_d_tokens: tuple[int, ...] | None


@dataclass(frozen=True)
class GrowDepth:
    factor: int
    init: str


@dataclass(frozen=True)
class GrowWidth:
    ffn_factor: float
    heads_factor: float
    split_noise: float


@dataclass(frozen=True)
class Stage2:
    """The second-stage methods (upcycling.transform.methods) and their options."""

    methods: tuple[str, ...]
    corpus: Corpus | None
    grow_depth: GrowDepth
    grow_width: GrowWidth


@dataclass(frozen=True)
class FitSettings:
    bootstrap: int
    huber_delta: float
    seed: int
    parameter_counts: str
    more_data_never_hurts: bool
    irreducible: str
    token_unit: str


@dataclass(frozen=True)
class SlurmSettings:
    partition: str | None
    account: str | None
    gpus_per_job: int
    nodes: int
    cpus_per_gpu: int
    cpu_threads: int
    runtime_margin: float
    startup_minutes: float
    throughput_tokens_per_s: Mapping[str, float] | None
    moe_throughput_factor: float
    signal_seconds_before_limit: int


@dataclass(frozen=True)
class Sweep:
    results_dir: Path
    corpus: Corpus
    tokenizer: TokenizerSettings
    data: Data
    dense_models: Mapping[str, DenseModel]
    training: Training
    sweep: Axes
    moe: MoESettings
    baselines: Baselines
    stage2: Stage2
    fit: FitSettings
    slurm: SlurmSettings
    # The validated mapping itself (plain dicts and lists, a private copy): what is written and hashed.
    mapping: dict[str, Any] = dataclasses.field(repr=False, compare=False, metadata={"raw": True})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Sweep:
        """The typed sweep of a mapping that the schema validated and filled with defaults."""
        return _build(cls, {**mapping, "mapping": copy.deepcopy(dict(mapping))})

    @property
    def scratch_d_tokens(self) -> tuple[int, ...]:
        return self.baselines.scratch_d_tokens or self.sweep.d2_tokens

    @property
    def tokens_dir(self) -> Path:
        return self.results_dir / "tokens"


# ----------------------------------------------------------------------------- mapping -> dataclasses


def _build(cls, values: Mapping[str, Any], where: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            raise KeyError(
                f"{cls.__name__}.{field.name}: missing from the validated config (every key needs a schema default)"
            )
        value = values[field.name]
        key = f"{where}{field.name}"
        kwargs[field.name] = value if field.metadata.get("raw") else _convert(hints[field.name], value, key)
    unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
    if unknown:
        raise KeyError(f"{cls.__name__}: keys {sorted(unknown)} have no field (add them to upcycling.sweep.settings)")
    return cls(**kwargs)


def _convert(hint, value, key: str):
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert(next(arg for arg in args if arg is not type(None)), value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if hint is Path:
        return Path(value)
    if origin is tuple:
        item = args[0]
        return tuple(_convert(item, element, f"{key}[{index}]") for index, element in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        value_type = args[1]
        # Read-only: the sweep is frozen all the way down.
        return types.MappingProxyType(
            {name: _convert(value_type, element, f"{key}.{name}") for name, element in value.items()}
        )
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        # The schema refuses these first; a mapping built another way must not pass a float on.
        raise InputError(f"config key '{key}': {value!r} is not an integer (write a whole number, e.g. 64)")
    return value
