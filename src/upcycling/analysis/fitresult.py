"""One fitted law as data: :class:`FitResult`, its JSON form, and ``to_jsonable``.

A result is written by :func:`upcycling.analysis.fitting.fit_law` (one JSON per law under
``results/fits/``) and read by the guidance, the findings and the report. Parameters are in
natural units (tokens, parameters as counted by the fit stage, see docs/fits.md).

``status`` says what the fit is worth, in this order of precedence:

- ``skipped``: not fitted (``reason`` says why: too few runs, no runs);
- ``not_converged``: the two optimisers (trust-region least squares, L-BFGS-B) disagree;
- ``at_bound``: the optimum sits on a bound (``at_bound`` names the parameters): an amplitude
  whose term vanishes (E -> 0 ...), a numerical limit, or the "more data never hurts" prior;
- ``singular``: J^T J is singular at the optimum (parameters not identified);
- ``converged``: none of the above.

Every fitted status (all but ``skipped``) has parameters; ``ok`` says that, ``converged`` the
last. ``identification`` says, per parameter, whether these runs identify it and, where not,
the smallest extension of the sweep that would (see :mod:`upcycling.analysis.diagnostics`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from upcycling.analysis.laws import Law, get_law
from upcycling.core.publish import publish_json

__all__ = ["DEFAULT_HUBER_DELTA", "INTERVAL_LEVEL", "STATUSES", "FitResult", "to_jsonable"]

DEFAULT_HUBER_DELTA = 1.0e-2  # chosen by benchmarks/coverage_study.py (docs/fits.md)
INTERVAL_LEVEL = 0.95
STATUSES = ("converged", "singular", "at_bound", "not_converged", "skipped")


def to_jsonable(value):
    """Plain JSON types; non-finite floats become None (strict JSON has no NaN/inf)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _nan_if_none(mapping: Mapping | None) -> dict:
    return {k: (math.nan if v is None else v) for k, v in (mapping or {}).items()}


def _open_ends(interval):
    """An interval read back from JSON: a null end is an open one (written from +-inf)."""
    if interval is None:
        return None
    low, high = interval
    return [-math.inf if low is None else low, math.inf if high is None else high]


@dataclass
class FitResult:
    """One law fitted to one data set. Parameters are in natural units (tokens, parameters)."""

    law: str
    formula: str
    variables: dict[str, str]  # law variable -> tidy-table field it was read from
    status: str = "converged"  # one of STATUSES (see the module docstring)
    status_detail: str = ""  # the status in words: which bound, which condition number
    reason: str | None = None  # why skipped
    params: Mapping[str, float] = field(default_factory=dict)  # read, never edited
    stderr: dict[str, float] = field(default_factory=dict)
    stderr_note: str = ""
    # 95% profile-likelihood interval (analysis/intervals.py); +-inf (null in JSON) where open
    interval: dict[str, list[float]] = field(default_factory=dict)
    interval_level: float = INTERVAL_LEVEL
    interval_method: dict[str, Any] = field(default_factory=dict)  # how: statistic, threshold
    bootstrap: dict[str, Any] = field(default_factory=dict)  # n, seed, method, samples
    rmse: float = math.nan  # on loss, nats
    huber: float = math.nan  # the minimised objective: sum of Huber(log residuals)
    huber_delta: float = DEFAULT_HUBER_DELTA
    aic: float = math.nan
    aicc: float = math.nan  # AIC with the small-sample correction
    bic: float = math.nan
    n_points: int = 0
    n_params: int = 0
    held_out: dict[str, dict[str, Any]] = field(default_factory=dict)
    at_bound: dict[str, str] = field(default_factory=dict)  # parameter -> which bound, why
    identification: dict[str, dict[str, Any]] = field(default_factory=dict)
    prior: dict[str, Any] = field(default_factory=dict)  # {"name", "active": [params]}
    solvers_agree: bool = False
    optimizer: dict[str, Any] = field(default_factory=dict)
    data_range: dict[str, list[float]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)  # what data: method, size, ...
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # fixed parameters: value, why
    # the dataset and joint laws: alpha1, alpha2 in token_unit; alpha3, alpha2 - alpha1 (unit-free)
    token_unit: str | None = None
    in_unit: dict[str, dict[str, Any]] = field(default_factory=dict)
    invariants: dict[str, dict[str, Any]] = field(default_factory=dict)
    two_step: dict[str, Any] = field(default_factory=dict)  # the dataset law: analysis/twostep.py

    @property
    def ok(self) -> bool:
        """Fitted (has parameters), whatever its status says of their quality."""
        return self.status != "skipped"

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    @property
    def key(self) -> str:
        return str(self.context.get("key", self.law))

    def not_identified(self) -> list[str]:
        return [name for name, entry in self.identification.items() if not entry.get("identified", True)]

    @classmethod
    def skipped(cls, law: str | Law, reason: str, context: Mapping | None = None) -> FitResult:
        law = get_law(law)
        return cls(
            law=law.name,
            formula=law.formula,
            variables=dict(law.fields),
            status="skipped",
            status_detail=reason,
            reason=reason,
            n_params=law.n_params,
            context=dict(context or {}),
        )

    def predict(self, **variables) -> np.ndarray:
        """Loss predicted by the fitted parameters at the given variables."""
        if not self.ok:
            raise ValueError(f"law {self.law!r} was not fitted: {self.reason}")
        return get_law(self.law).predict(self.params, **variables)

    def sample_params(self) -> list[dict[str, float]]:
        """The bootstrap parameter samples, one dict each."""
        samples = self.bootstrap.get("samples") or {}
        if not samples:
            return []
        count = len(next(iter(samples.values())))
        return [{name: values[i] for name, values in samples.items()} for i in range(count)]

    def predict_samples(self, **variables) -> np.ndarray:
        """Predictions of every bootstrap parameter sample, shape (samples, *broadcast)."""
        law = get_law(self.law)
        draws = self.sample_params()
        if not draws:
            return np.empty((0,))
        return np.stack([law.predict(draw, **variables) for draw in draws])

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> FitResult:
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in payload.items() if key in known}
        for key in ("params", "stderr"):
            data[key] = _nan_if_none(data.get(key))
        for key in ("rmse", "huber", "aic", "aicc", "bic"):
            data[key] = math.nan if data.get(key) is None else data[key]
        data["interval"] = {k: _open_ends(v) for k, v in (data.get("interval") or {}).items()}
        for block in ("in_unit", "invariants"):
            data[block] = {
                k: {**v, "interval": _open_ends(v.get("interval"))} for k, v in (data.get(block) or {}).items()
            }
        samples = (data.get("bootstrap") or {}).get("samples")
        if samples:
            data["bootstrap"] = {
                **data["bootstrap"],
                "samples": {k: [math.nan if v is None else v for v in values] for k, values in samples.items()},
            }
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (temporary name, then rename)."""
        return publish_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FitResult:
        return cls.from_dict(json.loads(Path(path).read_text()))
