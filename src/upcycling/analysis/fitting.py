"""Robust fitting of the scaling laws in :mod:`upcycling.analysis.laws` (Chinchilla approach 3, as
replicated by Besiroglu et al. 2024, arXiv 2404.10102).

Public functions:

- ``fit_law(law, data, *, huber_delta=1e-2, n_bootstrap=64, seed=0, holdout=True,
  context=None, n_starts=12, monotone=False, held=None, token_unit='billions') -> FitResult`` (:mod:`upcycling.analysis.fitresult`)
- ``check_data(law, data) -> dict[str, np.ndarray]``: the usable points, or ValueError
- ``huber(residuals, delta) -> np.ndarray``

Method. The objective is the sum of Huber losses (delta 1e-2 by default) of the residuals of
log loss, log L_pred - log L, with log L_pred a logsumexp of terms linear in the parameters
(exact gradients and Jacobians). The fit runs on variables scaled to the geometric mean of the
data (conditioning), within the law's bounds (only E >= 0 and amplitudes > 0 are physical; the
rest are numerical limits; ``monotone`` adds the "more data never hurts" prior), from the best
points of a grid of initial values: each is refined by trust-region least squares with scipy's
Huber loss (``scipy.optimize.least_squares``, ``loss='huber'``, ``f_scale=delta``: exactly the
objective above), the best is polished to tight tolerances, and L-BFGS-B (lmfit ``lbfgsb`` on the same
scalar objective, exact gradient) restarts from it; the two alternate until neither improves on
the other (``solvers_agree``). The status then also checks the bounds and J^T J
(:mod:`upcycling.analysis.fitresult`, :mod:`upcycling.analysis.diagnostics`).

Uncertainty. Standard errors: sigma^2 (J^T J)^-1 of the log residuals, delta method. The 95%
intervals (``interval``) are profile-likelihood intervals with every other parameter refitted
within its bounds, E free over [0, inf) (:mod:`upcycling.analysis.intervals`,
:mod:`upcycling.analysis.profile`); an open end is +-inf. A parameter is identified when its
interval is bounded and narrow (:mod:`upcycling.analysis.identify`), and nothing is in a fit that
ends on a bound (measured coverage there 73-78%, docs/fits.md). The case bootstrap (runs
resampled with replacement, an unidentifiable resample redrawn, refits from the fit and the
best grid points) gives the samples the guidance uses, its percentile intervals
(``bootstrap.percentile_interval``) and how often a refit ends on a bound
(``bootstrap.at_bound_fraction``). Held-out checks refit without the runs at the largest value
of each variable *from the grid of initial values*, never from an optimum that saw those runs,
and predict them. ``held`` fixes E (``fit.irreducible: shared_dense``); ``token_unit`` states
alpha1 and alpha2 in a unit (``in_unit``) beside the invariants alpha3 and alpha2 - alpha1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from upcycling.analysis import diagnostics
from upcycling.analysis.fitresult import DEFAULT_HUBER_DELTA, INTERVAL_LEVEL, FitResult
from upcycling.analysis.intervals import DEFAULT_TOKEN_UNIT, profile_fit
from upcycling.analysis.laws import Law, get_law
from upcycling.analysis.optimize import REFIT_TOLERANCES, LogProblem, grid_of_starts, huber, optimize

__all__ = ["DEFAULT_HUBER_DELTA", "PRIOR_NAME", "check_data", "fit_law", "huber"]

PRIOR_NAME = "more data never hurts"
_BOOTSTRAP_GRID_POOL = 16  # grid points of the full fit kept for bootstrap refits
_MAX_REDRAWS = 100  # attempts at an identifiable bootstrap resample


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
    arrays = {name: np.asarray(data[name], dtype=float).reshape(-1) for name in (*law.variables, "loss")}
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
            f"{law.n_params} parameters and needs at least {needed} distinct ({variables}) points"
        )
    arrays = {name: values[usable] for name, values in arrays.items()}
    distinct = len({tuple(row) for row in np.column_stack([arrays[v] for v in law.variables])})
    if distinct < needed:
        raise ValueError(
            f"law {law.name!r} has {law.n_params} parameters and needs at least {needed} "
            f"distinct ({variables}) points; got {distinct}"
        )
    for variable, minimum in law.min_distinct.items():
        count = np.unique(arrays[variable]).size
        if count < minimum:
            raise ValueError(
                f"law {law.name!r} needs at least {minimum} distinct values of {variable} "
                f"({law.fields[variable]}) to be identified; got {count}"
            )
    return arrays


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _identifiable(law: Law, arrays: Mapping[str, np.ndarray], index: np.ndarray) -> bool:
    try:
        check_data(law, {name: values[index] for name, values in arrays.items()})
    except ValueError:
        return False
    return True


def _loss_errors(predicted: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    error = predicted - observed
    return {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mean_abs_rel_error": float(np.mean(np.abs(error) / observed)),
        "max_abs_error": float(np.max(np.abs(error))),
    }


def _status(solvers_agree: bool, at_bound: Mapping[str, str], singular: bool, condition: float) -> tuple[str, str]:
    problems = []
    if not solvers_agree:
        problems.append("the two optimisers disagree (not converged)")
    if at_bound:
        problems.append("on a bound: " + "; ".join(f"{k} ({v})" for k, v in at_bound.items()))
    if singular:
        problems.append(f"J^T J singular (condition number {condition:.3g})")
    if not solvers_agree:
        return "not_converged", "; ".join(problems)
    if at_bound:
        return "at_bound", "; ".join(problems)
    if singular:
        return "singular", "; ".join(problems)
    return "converged", "optimisers agree, no parameter on a bound, J^T J regular"


def _bootstrap(law, arrays, refit, to_natural, n_bootstrap, seed, on_bound=None):
    """Case bootstrap: resample runs with replacement, refit; redraw unidentifiable resamples.
    ``on_bound(index, theta)``: the parameters a refit left on a bound (counted per parameter)."""
    rng = np.random.default_rng(seed)
    size = arrays["loss"].size
    samples: dict[str, list[float]] = {name: [] for name in law.natural_names}
    thetas, redrawn = [], 0
    hits: dict[str, int] = {}
    for _ in range(int(n_bootstrap)):
        for _attempt in range(_MAX_REDRAWS):
            index = rng.integers(0, size, size)
            if _identifiable(law, arrays, index):
                break
            redrawn += 1
        else:
            continue  # data too small for identifiable resamples: fewer samples
        thetas.append(refit(index))
        for name in on_bound(index, thetas[-1]) if on_bound else ():
            hits[name] = hits.get(name, 0) + 1
        sample = to_natural(thetas[-1])
        for name in law.natural_names:
            samples[name].append(sample[name])
    count = len(samples[law.natural_names[0]])
    info = {
        "n": int(n_bootstrap),
        "seed": int(seed),
        "method": "cases (runs resampled)",
        "redrawn": redrawn,
        "n_samples": count,
        # share of the refits that ended with the parameter on a bound: where it is large the
        # percentile interval sits on the bound too (the fit's intervals are the profile's)
        "at_bound_fraction": {name: hits.get(name, 0) / count for name in law.natural_names} if count else {},
        "samples": samples,
    }
    if redrawn > n_bootstrap:
        info["note"] = (
            f"{redrawn} of {redrawn + count} resamples could not identify the law "
            f"and were redrawn ({size} runs for {law.n_params} parameters)"
        )
    return info, np.array(thetas).reshape(-1, law.n_params)


def fit_law(
    law: str | Law,
    data: Mapping[str, Any],
    *,
    huber_delta: float = DEFAULT_HUBER_DELTA,
    n_bootstrap: int = 64,
    seed: int = 0,
    holdout: bool = True,
    context: Mapping[str, Any] | None = None,
    n_starts: int = 12,
    monotone: bool = False,
    held: Mapping[str, tuple[float, str]] | None = None,
    token_unit: str = DEFAULT_TOKEN_UNIT,
) -> FitResult:
    """Fit ``law`` to ``data``: a mapping of the law's variables and ``loss`` to 1-D arrays
    (one entry per run; NaN entries are dropped).

    n_starts: best grid points refined in the main fit and in each held-out refit; bootstrap
    refits start from the fit and the best grid points. monotone: the "more data never hurts"
    prior (reported in ``prior``, with the parameters it holds). held: natural parameter ->
    (value, why), fixed at that value (E shared with the dense fit). token_unit: the unit of
    the unit-stated exponents (``in_unit``; the parameters stay in tokens). Raises ValueError
    (naming the law and the points needed) when the data cannot identify the law.
    """
    law = get_law(law)
    arrays = check_data(law, data)
    loss = arrays["loss"]
    log_vars = {v: np.log(arrays[v]) for v in law.variables}
    log_ref = {v: float(np.mean(log_vars[v])) for v in law.variables}
    design = law.design({v: log_vars[v] - log_ref[v] for v in law.variables})
    problem = LogProblem(design, np.log(loss), float(huber_delta))
    unscale = law.unscale_matrix(log_ref)
    bounds = law.bounds(monotone)
    held = dict(held or {})
    unknown = sorted(set(held) - {spec.natural for spec in law.params if spec.name in ("log_E", "E")})
    if unknown:
        raise ValueError(f"law {law.name!r}: only E can be held fixed, not {', '.join(unknown)}")
    is_held = np.array([spec.natural in held for spec in law.params])
    grid = grid_of_starts(law, bounds)
    for i in np.flatnonzero(is_held):  # a held E: its log (= its fit-space value) pinned
        value = float(np.log(held[law.params[i].natural][0]))
        bounds[i] = (value - 1e-10, value + 1e-10)
        grid[:, i] = value
    if is_held.any():
        grid = np.unique(grid, axis=0)

    def to_natural(theta_scaled):
        return law.to_natural(unscale @ theta_scaled)

    best = optimize(law, problem, grid, n_starts, bounds)
    theta = best.theta
    params = to_natural(theta)
    log_residuals = problem.residuals(theta)
    at_bound = {k: v for k, v in diagnostics.bounds_hit(law, design, theta, monotone).items() if k not in held}
    fixed = np.array([spec.natural in at_bound for spec in law.params]) | is_held
    errors = diagnostics.standard_errors(law, problem.jacobian(theta), log_residuals, theta, unscale, fixed)
    profiled = profile_fit(
        law,
        problem,
        theta,
        bounds,
        unscale,
        log_residuals,
        is_held,
        _covariance(problem, theta, log_residuals),
        token_unit,
    )

    pool = grid[np.argsort(problem.objectives(grid), kind="stable")[:_BOOTSTRAP_GRID_POOL]]

    def refit(index: np.ndarray) -> np.ndarray:
        sub = problem.subset(index)
        return optimize(
            law, sub, pool, 1, bounds, extra_starts=[theta], verify=False, tolerances=REFIT_TOLERANCES
        ).theta

    def on_bound(index, refitted):
        hit = diagnostics.bounds_hit(law, design[index], refitted, monotone)
        return [name for name in hit if name not in held]

    bootstrap, scaled_samples = _bootstrap(law, arrays, refit, to_natural, n_bootstrap, seed, on_bound)
    tail = 100 * (1 - INTERVAL_LEVEL) / 2
    bootstrap["percentile_interval"] = {
        name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
        for name, values in bootstrap["samples"].items()
        if values
    }

    held_out = {}
    for variable in law.holdout if holdout else ():
        left_out = arrays[variable] == arrays[variable].max()
        entry: dict[str, Any] = {
            "field": law.fields[variable],
            "value": float(arrays[variable].max()),
            "n_points": int(left_out.sum()),
            "refit_from": "grid",
        }
        try:
            check_data(law, {k: v[~left_out] for k, v in arrays.items()})
        except ValueError as error:
            entry["skipped"] = f"too few points left: {error}"
        else:
            # from the grid, never from the optimum that saw the held-out runs
            fitted = to_natural(optimize(law, problem.subset(np.flatnonzero(~left_out)), grid, n_starts, bounds).theta)
            predicted = law.predict(fitted, **{v: arrays[v][left_out] for v in law.variables})
            entry.update(_loss_errors(predicted, loss[left_out]), params=fitted)
        held_out[variable] = entry

    judged = {
        name: (
            [0.0 if p.low <= bounds[i, 0] + 1e-9 else float(np.exp(p.low)), float(np.exp(p.high))]
            if law.params[i].is_log_amplitude
            else p.as_list()
        )
        for i, (name, p) in enumerate(profiled.judged.items())
    }
    identification = diagnostics.identification(
        law,
        theta,
        scaled_samples,
        unscale,
        errors,
        at_bound,
        arrays,
        log_ref,
        log_residuals,
        profiled=judged,
        held={name: why for name, (_, why) in held.items()},
    )
    status, detail = _status(best.details["solvers_agree"], at_bound, errors.singular, errors.condition)
    if at_bound:
        _not_identified_on_a_bound(identification, profiled, at_bound)
    prior = {}
    if monotone:
        active = [spec.natural for spec in law.params if spec.monotone and "prior" in at_bound.get(spec.natural, "")]
        prior = {"name": PRIOR_NAME, "active": active}
    return FitResult(
        law=law.name,
        formula=law.formula,
        variables=dict(law.fields),
        status=status,
        status_detail=detail,
        params=params,
        stderr=errors.errors,
        stderr_note=errors.note,
        interval=profiled.interval,
        interval_method=profiled.info,
        bootstrap=bootstrap,
        rmse=float(np.sqrt(np.mean((np.exp(log_residuals) * loss - loss) ** 2))),
        huber=best.objective,
        huber_delta=float(huber_delta),
        **diagnostics.information_criteria(log_residuals, law.n_params),
        n_points=int(loss.size),
        n_params=law.n_params,
        held_out=held_out,
        at_bound=at_bound,
        identification=identification,
        prior=prior,
        solvers_agree=best.details["solvers_agree"],
        optimizer=dict(best.details, grid_points=len(grid), log_reference=log_ref, condition_number=errors.condition),
        data_range={v: [float(arrays[v].min()), float(arrays[v].max())] for v in law.variables},
        context=dict(context or {}),
        token_unit=token_unit if profiled.in_unit else None,
        in_unit=profiled.in_unit,
        invariants=profiled.invariants,
        held={name: {"value": value, "why": why} for name, (value, why) in held.items()},
    )


def _not_identified_on_a_bound(identification, profiled, at_bound) -> None:
    """A fit that ends on a bound labels nothing identified. There the likelihood is not regular
    (the optimum on the boundary, a profile that can dip again towards the other side of an E-A
    ridge): the profile intervals are reported, but in the coverage study they covered the truth
    in only 73-78% of such fits (docs/fits.md), short of the 90% an "identified" label needs."""
    why = "the fit ends on a bound (" + ", ".join(at_bound) + "): its intervals are reported but do not identify"
    for entry in (*identification.values(), *profiled.in_unit.values(), *profiled.invariants.values()):
        if entry.get("identified"):
            entry.update(identified=False, why=why)


def _covariance(problem, theta, log_residuals):
    """sigma^2 (J^T J)^+ in fit space: the scale of a profile's first steps."""
    jacobian = problem.jacobian(theta)
    variance = float(log_residuals @ log_residuals) / max(log_residuals.size - theta.size, 1)
    return variance * np.linalg.pinv(jacobian.T @ jacobian, rcond=1e-14)
