"""The typed contract between the planner and the trainer: a training job's spec, where it starts,
and how far it has come.

The job inventory (:mod:`upcycling.pipeline.jobs`) builds a :class:`TrainSpec` per training job;
its canonical JSON (:meth:`TrainSpec.to_json`) is the job's Snakemake ``params`` and what
``upcycling train --spec`` reads back (:meth:`TrainSpec.from_json`). The JSON is exactly the
spec's fields, so a spec that crosses the command line arrives whole or is refused with one
:class:`~upcycling.core.errors.InputError` naming every missing, unknown or mistyped key.

Values keep the type JSON gave them: a float field accepts an integer (``rope_theta: 10000``) and
keeps it an integer, so decoding and encoding again give the same bytes, and the params of a run
finished before this module existed still match.

A job starts from one of three points (:data:`StartPoint`), spelled in JSON as the ``start`` key
always was: ``{"checkpoint": PATH}`` (the previous job of its WSD chain), ``{"export": PATH}``
(a portable export, e.g. an upcycled MoE) or ``{}`` (a fresh init). :class:`Progress` is what a
checkpoint carries for a resume (the client state of ours in a DeepSpeed checkpoint) and what a
run's metrics report as its curves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from upcycling.core.errors import InputError
from upcycling.core.fingerprint import canonical_json, fingerprint

# How to rebuild a spec that is refused (the message of every SpecError says it).
REBUILD = (
    "rebuild it from the DAG (snakemake passes each job its spec) or with `upcycling train --config CONFIG` "
    "and the job's flags (--family, --size, ... ; `upcycling plan --json` lists every job)"
)


class SpecError(InputError):
    """A job spec or a progress record that does not follow the contract; names every bad key."""


# ----------------------------------------------------------------------------- start points


@dataclass(frozen=True)
class FromCheckpoint:
    """Continue the checkpoint another job published (a WSD chain's previous job)."""

    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.path}


@dataclass(frozen=True)
class FromExport:
    """Start from a portable export's weights (and its Adam moments, where it holds them)."""

    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"export": self.path}


@dataclass(frozen=True)
class Fresh:
    """A fresh init drawn from the job's seed."""

    def to_dict(self) -> dict[str, Any]:
        return {}


StartPoint = FromCheckpoint | FromExport | Fresh  # a runtime alias: the codec recognises it
_START_KINDS: dict[str, type[FromCheckpoint] | type[FromExport]] = {
    "checkpoint": FromCheckpoint,
    "export": FromExport,
}


def start_point(value: Any, where: str = "start") -> StartPoint:
    """A start point from its JSON: ``{}``, ``{"checkpoint": PATH}`` or ``{"export": PATH}``."""
    problems: list[str] = []
    found = _decode_start(value, where, problems)
    if problems:
        raise SpecError(f"not a job's start point: {'; '.join(problems)}")
    return found


def _decode_start(value: Any, where: str, problems: list[str]) -> StartPoint:
    expected = "{} (fresh), {'checkpoint': PATH} or {'export': PATH}"
    if not isinstance(value, Mapping) or len(value) > 1:
        problems.append(f"key '{where}' is {_shown(value)}, expected exactly one of {expected}")
        return Fresh()
    if not value:
        return Fresh()
    ((kind, path),) = value.items()
    if kind not in _START_KINDS:
        problems.append(f"key '{where}.{kind}' is unknown, expected one of {expected}")
        return Fresh()
    if not isinstance(path, str):
        problems.append(f"key '{where}.{kind}' is {_shown(path)}, expected a path (a string)")
        return Fresh()
    return _START_KINDS[kind](path)


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ModelShape:
    """A model's config without its vocabulary size (known once the tokens exist: the trainer
    reads it from meta.json): upcycling.model.flops.ModelConfig's other fields."""

    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    seq_len: int
    rope_theta: float
    norm_eps: float
    experts: int
    top_k: int
    granularity: int
    explicit_head_dim: int | None


@dataclass(frozen=True)
class TrainingSettings:
    """The training settings that change a result (the rest of the config's section is how a job
    runs, not what it computes)."""

    micro_batch_size: int
    grad_accum_steps: int
    lr: float
    min_lr_ratio: float
    warmup_tokens: int
    schedule: str  # "wsd" | "cosine"
    decay_fraction: float
    weight_decay: float
    adam_betas: tuple[float, float]
    grad_clip: float
    eval_every_tokens: int
    eval_windows: int
    zero_stage: int
    precision: str  # "auto" | "bf16" | "fp32"
    compile: bool

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)


@dataclass(frozen=True)
class Coords:
    """Where a run's result sits in the sweep (the metrics' ``coords``): the jobs that end a run."""

    size: str
    init: str
    method: str
    seed: int
    d1_tokens: int
    d2_tokens: int
    experts: int
    top_k: int
    granularity: int
    # Drop-Upcycling's r. omit_default: left out of the JSON at 0 (may be missing), so older runs keep their bytes.
    reinit_ratio: float = dataclasses.field(default=0.0, metadata={"omit_default": True})


@dataclass(frozen=True)
class TrainSpec:
    """One training job: what its result depends on, and where it reads and writes.

    ``moe`` is the sweep's ``moe`` section as a mapping (None for a dense model), read by
    ``MoEOptions.from_settings``: its keys grow with the MoE layers' options. ``decay`` is
    ``[start, end]`` of the learning-rate decay for a job that ends a run (start None: cosine),
    None for a WSD stable job. ``checkpoint`` is a stable job's output; ``metrics`` (and, for a
    dense run, ``export``) a final job's.
    """

    job: str
    run_id: str
    family: str  # dense | upcycled | scratch
    phase: str  # stable | final
    seed: int
    model: ModelShape
    dense_model: ModelShape
    moe: Mapping[str, Any] | None
    training: TrainingSettings
    processes: int
    end_tokens: int
    decay: tuple[int | None, int] | None
    tokens_dir: str
    tokens: str  # the tokens' fingerprint
    start: StartPoint
    upstream: str  # the fingerprint of the job it starts from (or of the tokens)
    checkpoint: str | None
    partial: str
    metrics: str | None
    export: str | None
    export_adam_moments: bool
    coords: Coords | None

    @classmethod
    def from_json(cls, spec: str | Mapping[str, Any]) -> TrainSpec:
        """The spec of JSON text or of its parsed mapping; SpecError naming every bad key."""
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise SpecError(f"the training job's spec is not JSON ({exc}): {REBUILD}") from None
        problems: list[str] = []
        decoded = _decode(cls, spec, "", problems)
        if problems:
            raise SpecError(f"the training job's spec does not follow the contract ({'; '.join(problems)}): {REBUILD}")
        return decoded

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (dicts, lists, strings, numbers, None), as the params spell them."""
        return _encode(self)

    def to_json(self) -> str:
        """The canonical JSON: the job's Snakemake ``params``."""
        return canonical_json(self.to_dict())

    @property
    def fingerprint(self) -> str:
        """The job's fingerprint: sha256 of :meth:`to_json`."""
        return fingerprint(self.to_dict())


# ----------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    """How far a run has come: what a checkpoint keeps for a resume, and the metrics' curves.

    ``eval_tokens``/``val_loss``: the held-out loss at each evaluation; ``train_tokens``/
    ``train_loss``: the training loss at each logged step; ``wall_time_s``: the run's training
    time over all its jobs so far; ``expert_load``: per MoE layer, each expert's share of the
    tokens at the last evaluation (None for a dense model). The random number generators' states
    travel beside it in a checkpoint (upcycling.train.checkpoint), not in it.
    """

    tokens: int = 0
    step: int = 0
    eval_tokens: tuple[int, ...] = ()
    val_loss: tuple[float, ...] = ()
    train_tokens: tuple[int, ...] = ()
    train_loss: tuple[float, ...] = ()
    wall_time_s: float = 0.0
    expert_load: tuple[tuple[float, ...], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of a checkpoint's client state and of the metrics' curves."""
        return {
            "tokens": self.tokens,
            "step": self.step,
            "curve": {"tokens": list(self.eval_tokens), "val_loss": list(self.val_loss)},
            "train_curve": {"tokens": list(self.train_tokens), "loss": list(self.train_loss)},
            "wall_time_s": self.wall_time_s,
            "expert_load": None if self.expert_load is None else [list(layer) for layer in self.expert_load],
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], where: str = "the progress record") -> Progress:
        """The progress of :meth:`to_dict`'s JSON; SpecError naming ``where`` and the bad keys."""
        problems: list[str] = []
        flat = _decode(_ProgressJSON, state, "", problems)
        if problems:
            raise SpecError(f"{where} is not a progress record of upcycling train: {'; '.join(problems)}")
        return cls(
            tokens=flat.tokens,
            step=flat.step,
            eval_tokens=flat.curve.tokens,
            val_loss=flat.curve.val_loss,
            train_tokens=flat.train_curve.tokens,
            train_loss=flat.train_curve.loss,
            wall_time_s=flat.wall_time_s,
            expert_load=flat.expert_load,
        )


@dataclass(frozen=True)
class _EvalCurve:
    tokens: tuple[int, ...]
    val_loss: tuple[float, ...]


@dataclass(frozen=True)
class _TrainCurve:
    tokens: tuple[int, ...]
    loss: tuple[float, ...]


@dataclass(frozen=True)
class _ProgressJSON:
    """Progress as its JSON nests it (the codec checks it; Progress keeps flat fields)."""

    tokens: int
    step: int
    curve: _EvalCurve
    train_curve: _TrainCurve
    wall_time_s: float
    expert_load: tuple[tuple[float, ...], ...] | None


# ----------------------------------------------------------------------------- the codec


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    if origin is Mapping or (dataclasses.is_dataclass(hint)):
        return "an object"
    return str(hint)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(hint: Any, value: Any, where: str, problems: list[str]) -> Any:
    """``value`` checked against ``hint``, as the hint's type; problems appended as 'key ...'."""
    key = where or "<top level>"
    if hint is StartPoint:
        return _decode_start(value, where, problems)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            problems.append(f"key '{key}' is {_shown(value)}, expected an object")
            return None
        fields = _hints(hint)
        names = [field.name for field in dataclasses.fields(hint)]
        required = [f.name for f in dataclasses.fields(hint) if not f.metadata.get("omit_default")]
        missing = [name for name in required if name not in value]
        unknown = sorted(str(name) for name in value if name not in fields)
        if missing:
            listed = ", ".join(f"'{_join(where, name)}'" for name in missing)
            problems.append(f"key {listed} is missing" if len(missing) == 1 else f"keys {listed} are missing")
        if unknown:
            listed = ", ".join(f"'{_join(where, name)}'" for name in unknown)
            problems.append(f"key {listed} is unknown" if len(unknown) == 1 else f"keys {listed} are unknown")
        decoded = {
            name: _decode(fields[name], value[name], _join(where, name), problems) for name in names if name in value
        }
        if problems:
            return None
        return hint(**decoded)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arm in args:
            trial: list[str] = []
            candidate = _decode(arm, value, where, trial)
            if not trial:
                return candidate
        if type(None) in args and value is not None:
            inner = [arm for arm in args if arm is not type(None)]
            if len(inner) == 1 and not _scalar(inner[0]):
                return _decode(inner[0], value, where, problems)  # the inner type's own message
        problems.append(f"key '{key}' is {_shown(value)}, expected {_describe(hint)}")
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"key '{key}' is {_shown(value)}, expected a list")
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        else:
            items = list(args)
            if len(value) != len(items):
                problems.append(f"key '{key}' has {len(value)} items, expected {len(items)}")
                return None
        return tuple(
            _decode(item, element, f"{key}[{index}]", problems)
            for index, (item, element) in enumerate(zip(items, value))
        )
    if origin is Mapping:
        if not isinstance(value, Mapping) or not all(isinstance(name, str) for name in value):
            problems.append(f"key '{key}' is {_shown(value)}, expected an object")
            return None
        return dict(value)
    if hint is Any:
        return value
    if _matches(hint, value):
        return value
    problems.append(f"key '{key}' is {_shown(value)}, expected {_describe(hint)}")
    return None


def _scalar(hint: Any) -> bool:
    return hint in (int, float, bool, str, type(None))


def _matches(hint: Any, value: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an integer is a number too, and stays one (byte-identical JSON)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    raise TypeError(f"the spec codec has no rule for {hint!r}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _encode(value: Any) -> Any:
    """Plain JSON values of a spec (dataclasses to dicts, tuples to lists, start points to theirs)."""
    if isinstance(value, (FromCheckpoint, FromExport, Fresh)):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [(f, getattr(value, f.name)) for f in dataclasses.fields(value)]
        return {f.name: _encode(v) for f, v in fields if not (f.metadata.get("omit_default") and v == f.default)}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    if isinstance(value, Mapping):
        return {name: _encode(item) for name, item in value.items()}
    return value
