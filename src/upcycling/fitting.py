"""Robust fitting of the scaling laws in :mod:`upcycling.laws` (Chinchilla approach 3, as
replicated by Besiroglu et al. 2024, arXiv 2404.10102).

Public functions and classes:

- ``fit_law(law, data, *, huber_delta=1e-3, n_bootstrap=64, seed=0, holdout=True,
  context=None, n_starts=12) -> FitResult``
- ``check_data(law, data) -> dict[str, np.ndarray]``: the usable points, or ValueError
- ``huber(residuals, delta) -> np.ndarray``
- ``to_jsonable(value)``: plain JSON types, non-finite floats as None
- ``FitResult``: parameters (natural units), standard errors, bootstrap intervals and samples,
  RMSE, Huber objective, AIC/BIC, held-out errors; ``predict``, ``predict_samples``,
  ``to_dict``/``from_dict``, ``save``/``load`` (one JSON per law); ``FitResult.skipped(...)``.

Method. The objective is the sum of Huber losses (delta 1e-3 by default) of the residuals of
log loss, log L_pred - log L, with log L_pred a logsumexp of terms linear in the parameters
(exact gradients and Jacobians). The fit runs on variables scaled to the geometric mean of the
data (conditioning), within bounds, from the best points of a grid of initial values: each is
refined by trust-region least squares with scipy's Huber loss (lmfit ``least_squares``,
``loss='huber'``, ``f_scale=delta``: exactly the objective above), the best is polished to
tight tolerances, and L-BFGS-B (lmfit ``lbfgsb`` on the same scalar objective, exact gradient,
ftol 1e-16) restarts from it; the two alternate until neither improves on the other, and only
then is the fit flagged ``converged``. These laws are weakly identified: a fit that stops early
predicts well while its coefficients are far off.

Uncertainty. Standard errors come from the asymptotic covariance sigma^2 (J^T J)^-1 of the
log-residuals at the fit (J: Jacobian of log L_pred, sigma^2 = RSS / (n - p)), mapped to natural
units by the delta method; they are NaN, with the reason recorded, when J^T J is singular. The
bootstrap resamples runs with replacement (a resample that cannot identify the law, e.g. with
too few distinct points, is redrawn) and refits from the best fit (plus the best grid point
when it starts lower); intervals are percentile 95%.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmfit
import numpy as np

from upcycling.laws import Law, get_law

__all__ = ["DEFAULT_HUBER_DELTA", "FitResult", "check_data", "fit_law", "huber", "to_jsonable"]

DEFAULT_HUBER_DELTA = 1.0e-3
INTERVAL_LEVEL = 0.95

# L-BFGS-B stops when the objective changes by less than ftol * max(|f|, 1): the objective is
# a sum of Huber losses of order 1e-6..1e-2, so ftol must be far below the default to converge.
_LBFGSB_OPTIONS = dict(maxiter=20000, maxfun=40000, ftol=1e-16, gtol=1e-13, maxcor=20)
_LSQ_TOLERANCES = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=20000)
# Screening the starts, and bootstrap / held-out refits: coefficients far more precise than
# their spread across resamples, not at machine precision; the main fit's best start is then
# polished with _LSQ_TOLERANCES. (With a tiny Huber delta the objective is nearly L1, and in a
# degenerate valley the trust region crawls: the evaluation cap bounds that.)
_SCREEN_TOLERANCES = dict(ftol=1e-10, xtol=1e-10, gtol=1e-10, max_nfev=1000)
_AGREEMENT = 1e-6  # relative objective difference at which two solvers "agree"
_GRID_CHUNK = 2048  # grid points evaluated per vectorised block (bounds memory)
_BOOTSTRAP_GRID_POOL = 16  # grid points of the full fit kept for bootstrap / held-out refits
_MAX_CONDITION = 1e13  # J^T J beyond this condition number: parameters not identified
_MAX_REDRAWS = 100  # attempts at an identifiable bootstrap resample


def huber(residuals: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss: r^2 / 2 for |r| <= delta, delta * (|r| - delta / 2) beyond."""
    r = np.abs(np.asarray(residuals, dtype=float))
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


# --------------------------------------------------------------------------------------------
# Data checks
# --------------------------------------------------------------------------------------------


def check_data(law: str | Law, data: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The finite, positive points of ``data`` (law variables and ``loss``) as float arrays.

    Raises ValueError, naming the law, when a variable is missing, no point is usable (all
    NaN), or there are fewer distinct points (or distinct values of a variable) than the law
    needs to be identified.
    """
    law = get_law(law)
    missing = [name for name in (*law.variables, "loss") if name not in data]
    if missing:
        raise ValueError(f"law {law.name!r}: data lack {', '.join(missing)}")
    arrays = {name: np.asarray(data[name], dtype=float).reshape(-1)
              for name in (*law.variables, "loss")}
    sizes = {a.size for a in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"law {law.name!r}: data arrays differ in length ({sorted(sizes)})")
    usable = np.ones(sizes.pop(), dtype=bool)
    for values in arrays.values():
        usable &= np.isfinite(values) & (values > 0)
    needed = law.n_params + 1
    variables = ", ".join(law.variables)
    if not usable.any():
        raise ValueError(
            f"law {law.name!r}: no usable data points (all NaN or non-positive); it has "
            f"{law.n_params} parameters and needs at least {needed} distinct ({variables}) points")
    arrays = {name: values[usable] for name, values in arrays.items()}
    distinct = len({tuple(row) for row in np.column_stack([arrays[v] for v in law.variables])})
    if distinct < needed:
        raise ValueError(
            f"law {law.name!r} has {law.n_params} parameters and needs at least {needed} "
            f"distinct ({variables}) points; got {distinct}")
    for variable, minimum in law.min_distinct.items():
        count = np.unique(arrays[variable]).size
        if count < minimum:
            raise ValueError(
                f"law {law.name!r} needs at least {minimum} distinct values of {variable} "
                f"({law.fields[variable]}) to be identified; got {count}")
    return arrays


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LogProblem:
    """Huber regression of log loss on a law's logsumexp prediction (scaled variables)."""

    design: np.ndarray  # (points, terms, params)
    log_loss: np.ndarray  # (points,)
    delta: float

    def _prediction(self, theta):
        terms = self.design @ theta
        peak = terms.max(axis=1)
        weights = np.exp(terms - peak[:, None])
        total = weights.sum(axis=1)
        return peak + np.log(total), weights / total[:, None]

    @property
    def objective_floor(self) -> float:
        """Objective differences below this are noise: residuals of ~1e-6 * delta each."""
        return 0.5 * self.log_loss.size * (1e-6 * self.delta) ** 2

    def residuals(self, theta):
        return self._prediction(theta)[0] - self.log_loss

    def jacobian(self, theta):
        """d log L_pred / d theta: the softmax-weighted design rows."""
        weights = self._prediction(theta)[1]
        return np.einsum("nm,nmp->np", weights, self.design)

    def objective(self, theta):
        return float(huber(self.residuals(theta), self.delta).sum())

    def gradient(self, theta):
        log_pred, weights = self._prediction(theta)
        jac = np.einsum("nm,nmp->np", weights, self.design)
        return jac.T @ np.clip(log_pred - self.log_loss, -self.delta, self.delta)

    def objectives(self, thetas):
        """Objective at many parameter vectors at once (grid search)."""
        out = np.empty(len(thetas))
        for start in range(0, len(thetas), _GRID_CHUNK):
            block = thetas[start:start + _GRID_CHUNK]
            terms = np.einsum("nmp,gp->gnm", self.design, block)
            peak = terms.max(axis=2)
            log_pred = peak + np.log(np.exp(terms - peak[..., None]).sum(axis=2))
            out[start:start + _GRID_CHUNK] = huber(log_pred - self.log_loss, self.delta).sum(axis=1)
        return np.where(np.isfinite(out), out, np.inf)

    def subset(self, index):
        return _LogProblem(self.design[index], self.log_loss[index], self.delta)


@dataclass
class _Optimum:
    theta: np.ndarray
    objective: float
    details: dict


def _parameters(law: Law, theta: np.ndarray) -> lmfit.Parameters:
    params = lmfit.Parameters()
    for spec, value in zip(law.params, theta):
        low, high = spec.bounds
        # lmfit maps bounded parameters through a sine; exactly at a bound the gradient vanishes
        margin = 1e-9 * (high - low)
        params.add(spec.name, value=float(np.clip(value, low + margin, high - margin)),
                   min=low, max=high)
    return params


def _vector(law: Law, params: lmfit.Parameters) -> np.ndarray:
    return np.array([params[name].value for name in law.param_names])


def _lbfgsb(law: Law, problem: _LogProblem, theta0: np.ndarray):
    minimizer = lmfit.Minimizer(lambda p: problem.objective(_vector(law, p)),
                                _parameters(law, theta0), calc_covar=False)
    result = minimizer.minimize(method="lbfgsb",
                                jac=lambda p: problem.gradient(_vector(law, p)),
                                options=dict(_LBFGSB_OPTIONS))
    theta = _vector(law, result.params)
    return theta, problem.objective(theta), str(result.message)


def _least_squares(law: Law, problem: _LogProblem, theta0: np.ndarray, tolerances=None):
    """Trust-region reflective least squares with scipy's Huber loss, from theta0.

    scipy's cost with loss='huber' and f_scale=delta is sum(huber(r, delta)) exactly, the
    objective that L-BFGS-B minimises; lmfit passes the bounds natively here.
    """
    minimizer = lmfit.Minimizer(lambda p: problem.residuals(_vector(law, p)),
                                _parameters(law, theta0), calc_covar=False)
    result = minimizer.minimize(method="least_squares", loss="huber", f_scale=problem.delta,
                                jac=lambda p: problem.jacobian(_vector(law, p)),
                                **(tolerances or _LSQ_TOLERANCES))
    theta = _vector(law, result.params)
    return theta, problem.objective(theta), str(result.message)


def _grid(law: Law) -> np.ndarray:
    return np.array(list(itertools.product(*(spec.grid for spec in law.params))), dtype=float)


def _optimize(law: Law, problem: _LogProblem, candidates: np.ndarray, n_starts: int,
              extra_starts: list[np.ndarray] = (), verify: bool = True) -> _Optimum:
    """Best local optimum from the n_starts best candidates (and the extra starts).

    Each start is refined by trust-region least squares with the Huber loss. With ``verify``
    (the main fit) the best is polished to tight tolerances, then L-BFGS-B (a different
    algorithm on the same objective) restarts from it, the two alternating until neither
    improves on the other by more than 1e-6 relative.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        objectives = problem.objectives(candidates)
        if len(extra_starts):
            # refits start from a previous optimum; grid points join only if they start lower
            threshold = problem.objectives(np.asarray(extra_starts, dtype=float)).min()
            lower = objectives < threshold
            candidates, objectives = candidates[lower], objectives[lower]
    ranked = candidates[np.argsort(objectives, kind="stable")]
    starts = [*extra_starts, *ranked[:n_starts]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        runs = sorted((_least_squares(law, problem, np.asarray(theta0, dtype=float),
                                      _SCREEN_TOLERANCES) for theta0 in starts),
                      key=lambda run: run[1])
        theta, objective, lsq_message = runs[0]
        details = {
            "starts": len(starts),
            # starts reaching the best objective to 1e-6 relative: few of them flag a rugged
            # landscape (informative, not a requirement)
            "agreeing_starts": int(sum(
                abs(run[1] - objective) <= _AGREEMENT * (abs(objective) + problem.objective_floor)
                for run in runs)),
        }
        if not verify:
            return _Optimum(theta, objective, {**details, "least_squares_message": lsq_message})
        polished = _least_squares(law, problem, theta, _LSQ_TOLERANCES)
        if polished[1] <= objective:
            theta, objective, lsq_message = polished
        for rounds in range(1, 4):
            check = _lbfgsb(law, problem, theta)
            gain = (objective - check[1]) / (abs(objective) + problem.objective_floor)
            if gain <= _AGREEMENT:
                break
            # L-BFGS-B found lower ground: continue from there with the other solver
            polished = _least_squares(law, problem, check[0], _LSQ_TOLERANCES)
            theta, objective, lsq_message = min(polished, check, key=lambda run: run[1])
    details.update({
        "lbfgsb_message": check[2],
        "least_squares_message": lsq_message,
        "verify_rounds": rounds,
        # relative gain of L-BFGS-B over the least-squares optimum: ~0 at a true minimum
        "lbfgsb_relative_gain": gain,
        "converged": bool(gain <= _AGREEMENT),
    })
    return _Optimum(theta, objective, details)


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


def to_jsonable(value):
    """Plain JSON types; non-finite floats become None (strict JSON has no NaN/inf)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _nan_if_none(mapping: Mapping | None) -> dict:
    return {k: (math.nan if v is None else v) for k, v in (mapping or {}).items()}


@dataclass
class FitResult:
    """One law fitted to one data set. Parameters are in natural units (tokens, parameters)."""

    law: str
    formula: str
    variables: dict[str, str]  # law variable -> tidy-table field it was read from
    status: str = "ok"  # "ok" | "skipped"
    reason: str | None = None  # why skipped
    params: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    stderr_note: str = ""
    interval: dict[str, list[float]] = field(default_factory=dict)  # bootstrap percentile
    interval_level: float = INTERVAL_LEVEL
    bootstrap: dict[str, Any] = field(default_factory=dict)  # n, seed, samples (per param)
    rmse: float = math.nan  # on loss, nats
    huber: float = math.nan  # the minimised objective: sum of Huber(log residuals)
    huber_delta: float = DEFAULT_HUBER_DELTA
    aic: float = math.nan
    bic: float = math.nan
    n_points: int = 0
    n_params: int = 0
    held_out: dict[str, dict[str, Any]] = field(default_factory=dict)
    converged: bool = False
    optimizer: dict[str, Any] = field(default_factory=dict)
    data_range: dict[str, list[float]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)  # what data: size, experts ...

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def skipped(cls, law: str | Law, reason: str, context: Mapping | None = None) -> FitResult:
        law = get_law(law)
        return cls(law=law.name, formula=law.formula, variables=dict(law.fields),
                   status="skipped", reason=reason, n_params=law.n_params,
                   context=dict(context or {}))

    def predict(self, **variables) -> np.ndarray:
        """Loss predicted by the fitted parameters at the given variables."""
        if not self.ok:
            raise ValueError(f"law {self.law!r} was not fitted: {self.reason}")
        return get_law(self.law).predict(self.params, **variables)

    def predict_samples(self, **variables) -> np.ndarray:
        """Predictions of every bootstrap parameter sample, shape (samples, *broadcast)."""
        samples = self.bootstrap.get("samples") or {}
        if not samples:
            return np.empty((0,))
        law = get_law(self.law)
        count = len(next(iter(samples.values())))
        return np.stack([
            law.predict({name: samples[name][i] for name in law.natural_names}, **variables)
            for i in range(count)
        ])

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> FitResult:
        data = dict(payload)
        for key in ("params", "stderr"):
            data[key] = _nan_if_none(data.get(key))
        for key in ("rmse", "huber", "aic", "bic"):
            data[key] = math.nan if data.get(key) is None else data[key]
        samples = (data.get("bootstrap") or {}).get("samples")
        if samples:
            data["bootstrap"] = {**data["bootstrap"], "samples": {
                k: [math.nan if v is None else v for v in values] for k, values in samples.items()}}
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FitResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _identifiable(law: Law, arrays: Mapping[str, np.ndarray], index: np.ndarray) -> bool:
    try:
        check_data(law, {name: values[index] for name, values in arrays.items()})
    except ValueError:
        return False
    return True


def _gaussian_information_criteria(log_residuals: np.ndarray, n_params: int):
    """AIC and BIC of a Gaussian likelihood of the log residuals (variance fitted: p + 1)."""
    n = log_residuals.size
    variance = max(float(np.mean(log_residuals ** 2)), np.finfo(float).tiny)
    log_likelihood = -0.5 * n * (math.log(2 * math.pi * variance) + 1)
    k = n_params + 1
    return 2 * k - 2 * log_likelihood, k * math.log(n) - 2 * log_likelihood


def _standard_errors(law: Law, problem: _LogProblem, theta: np.ndarray,
                     unscale: np.ndarray) -> tuple[dict[str, float], str]:
    """Delta-method standard errors of the natural parameters, or NaN and why.

    Parameters pinned at a bound are held fixed (their error is NaN): a pinned amplitude's
    Jacobian column vanishes and would make J^T J singular for all the others.
    """
    nan = {name: math.nan for name in law.natural_names}
    n, p = problem.log_loss.size, law.n_params
    if n <= p:
        return nan, f"no degrees of freedom ({n} points, {p} parameters)"
    bounds = np.array([spec.bounds for spec in law.params])
    width = bounds[:, 1] - bounds[:, 0]
    pinned = np.minimum(theta - bounds[:, 0], bounds[:, 1] - theta) <= 1e-6 * width
    free = np.flatnonzero(~pinned)
    if free.size == 0:
        return nan, "every parameter is at a bound"
    jac = problem.jacobian(theta)[:, free]
    information = jac.T @ jac
    condition = np.linalg.cond(information)
    if not np.isfinite(condition) or condition > _MAX_CONDITION:
        return nan, (f"J^T J is singular (condition number {condition:.3g}): parameters not "
                     f"identified")
    residuals = problem.residuals(theta)
    variance = float(residuals @ residuals) / (n - free.size)
    to_natural = unscale[:, free]
    covariance = to_natural @ (variance * np.linalg.inv(information)) @ to_natural.T
    natural_theta = unscale @ theta
    errors = {}
    for i, spec in enumerate(law.params):
        se = math.nan if pinned[i] else math.sqrt(max(covariance[i, i], 0.0))
        # amplitude A = exp(log A): dA = A * d(log A)
        errors[spec.natural] = float(np.exp(natural_theta[i]) * se) if spec.is_log_amplitude else se
    note = "asymptotic sigma^2 (J^T J)^-1 of log residuals at the Huber fit, delta method"
    if pinned.any():
        names = ", ".join(spec.name for spec, at in zip(law.params, pinned) if at)
        note += f"; held fixed at a bound (no standard error): {names}"
    return errors, note


def _loss_errors(predicted: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    error = predicted - observed
    return {
        "rmse": float(np.sqrt(np.mean(error ** 2))),
        "mean_abs_rel_error": float(np.mean(np.abs(error) / observed)),
        "max_abs_error": float(np.max(np.abs(error))),
    }


def fit_law(law: str | Law, data: Mapping[str, Any], *,
            huber_delta: float = DEFAULT_HUBER_DELTA, n_bootstrap: int = 64, seed: int = 0,
            holdout: bool = True, context: Mapping[str, Any] | None = None,
            n_starts: int = 12) -> FitResult:
    """Fit ``law`` to ``data``: a mapping of the law's variables and ``loss`` to 1-D arrays
    (one entry per run; NaN entries are dropped).

    n_starts: best grid points refined by L-BFGS-B in the main fit; bootstrap and held-out
    refits start from the best fit and the best few grid points. Raises ValueError (naming the
    law and the points needed) when the data cannot identify the law.
    """
    law = get_law(law)
    arrays = check_data(law, data)
    loss = arrays["loss"]
    log_vars = {v: np.log(arrays[v]) for v in law.variables}
    log_ref = {v: float(np.mean(log_vars[v])) for v in law.variables}
    design = law.design({v: log_vars[v] - log_ref[v] for v in law.variables})
    problem = _LogProblem(design, np.log(loss), float(huber_delta))
    unscale = law.unscale_matrix(log_ref)

    grid = _grid(law)
    best = _optimize(law, problem, grid, n_starts)
    theta = best.theta
    params = law.to_natural(unscale @ theta)
    # grid points near the best fit's basin, reused as cheap extra starts for refits
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        pool = grid[np.argsort(problem.objectives(grid), kind="stable")[:_BOOTSTRAP_GRID_POOL]]

    def refit(index: np.ndarray) -> np.ndarray:
        sub = problem.subset(index)
        return _optimize(law, sub, pool, n_starts=1, extra_starts=[theta], verify=False).theta

    log_residuals = problem.residuals(theta)
    predicted = np.exp(log_residuals) * loss
    aic, bic = _gaussian_information_criteria(log_residuals, law.n_params)
    stderr, stderr_note = _standard_errors(law, problem, theta, unscale)

    # bootstrap: resample runs with replacement, refit, percentile interval
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in law.natural_names}
    redrawn = 0
    for _ in range(int(n_bootstrap)):
        for _attempt in range(_MAX_REDRAWS):
            index = rng.integers(0, loss.size, loss.size)
            if _identifiable(law, arrays, index):
                break
            redrawn += 1
        else:
            continue  # data too small for identifiable resamples: fewer samples
        sample = law.to_natural(unscale @ refit(index))
        for name in law.natural_names:
            samples[name].append(sample[name])
    bootstrap = {"n": int(n_bootstrap), "seed": int(seed), "redrawn": redrawn,
                 "n_samples": len(samples[law.natural_names[0]]), "samples": samples}
    if redrawn > n_bootstrap:
        # most resamples of so few runs cannot identify the law; those that can are close to
        # permutations of the data, so the spread understates the uncertainty
        bootstrap["note"] = (f"{redrawn} of {redrawn + bootstrap['n_samples']} resamples could "
                             f"not identify the law and were redrawn: intervals understate the "
                             f"uncertainty ({loss.size} runs for {law.n_params} parameters)")
    tail = 100 * (1 - INTERVAL_LEVEL) / 2
    interval = {name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
                for name, values in samples.items() if values}

    held_out = {}
    if holdout:
        for variable in law.holdout:
            values = arrays[variable]
            largest = float(values.max())
            held = values == largest
            entry: dict[str, Any] = {"field": law.fields[variable], "value": largest,
                                     "n_points": int(held.sum())}
            try:
                check_data(law, {k: v[~held] for k, v in arrays.items()})
            except ValueError as error:
                entry["skipped"] = f"too few points left: {error}"
            else:
                fitted = law.to_natural(unscale @ refit(np.flatnonzero(~held)))
                prediction = law.predict(fitted, **{v: arrays[v][held] for v in law.variables})
                entry.update(_loss_errors(prediction, loss[held]))
                entry["params"] = fitted
            held_out[variable] = entry

    details = dict(best.details, grid_points=len(grid), log_reference=log_ref)
    return FitResult(
        law=law.name,
        formula=law.formula,
        variables=dict(law.fields),
        params=params,
        stderr=stderr,
        stderr_note=stderr_note,
        interval=interval,
        bootstrap=bootstrap,
        rmse=float(np.sqrt(np.mean((predicted - loss) ** 2))),
        huber=best.objective,
        huber_delta=float(huber_delta),
        aic=aic,
        bic=bic,
        n_points=int(loss.size),
        n_params=law.n_params,
        held_out=held_out,
        converged=best.details["converged"],
        optimizer=details,
        data_range={v: [float(arrays[v].min()), float(arrays[v].max())] for v in law.variables},
        context=dict(context or {}),
    )
