"""What one fit is worth: information criteria, bounds, standard errors, identification, and
the smallest extension of the sweep that would identify a parameter the runs leave open.

Pure functions of a law, its fit-space design (variables scaled to their reference) and the
fitted parameters; :func:`upcycling.analysis.fitting.fit_law` calls them.

- ``log_jacobian(design, theta)``: d log L / d theta (softmax-weighted design rows)
- ``information_criteria(log_residuals, n_params) -> {"aic", "aicc", "bic"}``
- ``bounds_hit(law, design, theta, monotone) -> {param: why}``
- ``standard_errors(law, jacobian, residuals, theta, unscale, fixed) -> StandardErrors``
- ``identified(spec, value, interval, bound) -> (bool, why)``
- ``identification(law, theta, scaled_samples, unscale, errors, at_bound, arrays, log_ref,
  log_residuals) -> {param: {"identified", "why", "interval", "extension", ...}}``

Identification rule (:func:`upcycling.analysis.identify.identified`, on the fit's profile
intervals). A parameter is *not identified by these runs* when it sits on a bound, when its 95%
interval is open on a side (unbounded up to a numerical limit), or when it spans more than a
decade: for an amplitude (A, B, F, E > 0) the interval's
ends differ by more than a factor 10 (an amplitude is judged by its term's size at the centre
of the data, see ``judged_matrix``); for an exponent (whose sign the law leaves free) the
interval is wider than ten times the estimate's magnitude. The suggested extension is the
cheapest candidate (fewest runs, then fewest tokens) among new values of one variable (x2, x4 of
its largest value, half its smallest) run at one corner or across every existing combination of
the other variables, whose Fisher information J^T J, added to that of the runs, shrinks the
interval enough; the interval shrinks by the ratio of the delta-method standard errors with and
without the new runs (the noise level and the parameters kept at the fit's).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from upcycling.analysis.identify import DECADE, identified
from upcycling.analysis.laws import Law, ParamSpec

__all__ = [
    "DECADE",
    "InformationCriteria",
    "StandardErrors",
    "bounds_hit",
    "identification",
    "identified",
    "information_criteria",
    "judged_matrix",
    "log_jacobian",
    "standard_errors",
    "suggest_extensions",
]

MAX_CONDITION = 1e13  # J^T J beyond this condition number: singular (parameters not identified)
BOUND_TOLERANCE = 1e-6  # distance to a bound, relative to the bounds' width, that counts as on it
VANISHING_SHARE = 1e-4  # a term below this share of the loss at every run is absent (amplitude 0)
LABELS = {"d1": "D1", "d2": "D2", "n1": "N1", "n2": "N2", "p": "P", "n": "N", "d": "D"}
_Z95 = 1.959963984540054


def _term_shares(design: np.ndarray, theta: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """Each term's share of the loss at every point (a softmax of the log terms)."""
    terms = design @ theta if offset is None else design @ theta + offset
    shares = np.exp(terms - terms.max(axis=1, keepdims=True))
    shares /= shares.sum(axis=1, keepdims=True)
    return shares


def log_jacobian(design: np.ndarray, theta: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """d log L / d theta at every point: the design rows weighted by each term's share."""
    return np.einsum("nm,nmp->np", _term_shares(design, theta, offset), design)


class InformationCriteria(TypedDict):
    """The FitResult fields of the same names."""

    aic: float
    aicc: float
    bic: float


def information_criteria(log_residuals: np.ndarray, n_params: int) -> InformationCriteria:
    """AIC, AICc and BIC of a Gaussian likelihood of the log residuals (variance fitted: k =
    params + 1). At a Huber optimum this is an approximation (the fit is not the Gaussian
    maximum-likelihood one); AICc adds 2k(k+1)/(n-k-1), infinite when n <= k + 1."""
    n = log_residuals.size
    variance = max(float(np.mean(log_residuals**2)), np.finfo(float).tiny)
    log_likelihood = -0.5 * n * (math.log(2 * math.pi * variance) + 1)
    k = n_params + 1
    aic = 2 * k - 2 * log_likelihood
    aicc = aic + 2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf
    return {"aic": aic, "aicc": aicc, "bic": k * math.log(n) - 2 * log_likelihood}


def bounds_hit(law: Law, design: np.ndarray, theta: np.ndarray, monotone: bool = False) -> dict[str, str]:
    """Parameters (natural names) on a bound at ``theta``, each with why.

    An amplitude whose term is below 1e-4 of the loss at every run is at its physical bound 0
    however far its log is from the numerical one; an exponent at 0 under the prior is on the
    prior's bound.
    """
    bounds = law.bounds(monotone)
    width = bounds[:, 1] - bounds[:, 0]
    out: dict[str, str] = {}
    for i, spec in enumerate(law.params):
        low, high = bounds[i]
        if theta[i] - low <= BOUND_TOLERANCE * width[i]:
            if monotone and spec.monotone and low == 0.0:
                out[spec.natural] = "on the prior 'more data never hurts' (local slope 0 at the centre of the data)"
            else:
                out[spec.natural] = f"at its numerical lower limit ({low:g} in fit space)"
        elif high - theta[i] <= BOUND_TOLERANCE * width[i]:
            out[spec.natural] = f"at its numerical upper limit ({high:g} in fit space)"
    shares = _term_shares(design, theta)
    for name, j in law.amplitude_terms().items():
        natural = name[4:]
        if shares[:, j].max() < VANISHING_SHARE:
            out[natural] = (
                f"{natural} -> 0: its term is below {VANISHING_SHARE:g} of the loss at "
                f"every run (the physical bound {natural} >= 0)"
            )
    return out


def _noise_variance(log_residuals: np.ndarray, n_free: int) -> float:
    """sigma^2 of the log residuals: their sum of squares over the degrees of freedom (>= 1)."""
    return float(log_residuals @ log_residuals) / max(log_residuals.size - n_free, 1)


@dataclass(frozen=True)
class StandardErrors:
    errors: dict[str, float]  # natural units; NaN where fixed or singular
    note: str
    singular: bool
    condition: float
    log_variance: np.ndarray | None = None  # diag of the natural fit-space covariance


def standard_errors(
    law: Law, jacobian: np.ndarray, residuals: np.ndarray, theta: np.ndarray, unscale: np.ndarray, fixed: np.ndarray
) -> StandardErrors:
    """Delta-method standard errors sigma^2 (J^T J)^-1 of the natural parameters, or NaN and why.

    ``fixed``: parameters held at their bound (no error): a vanished amplitude's Jacobian
    column is zero and would make J^T J singular for all the others.
    """
    nan = {name: math.nan for name in law.natural_names}
    n, p = residuals.size, law.n_params
    if n <= p:
        return StandardErrors(nan, f"no degrees of freedom ({n} points, {p} parameters)", False, math.nan)
    free = np.flatnonzero(~fixed)
    if free.size == 0:
        return StandardErrors(nan, "every parameter is at a bound", False, math.nan)
    information = jacobian[:, free].T @ jacobian[:, free]
    condition = float(np.linalg.cond(information))
    if not math.isfinite(condition) or condition > MAX_CONDITION:
        return StandardErrors(
            nan, f"J^T J is singular (condition number {condition:.3g}): parameters not identified", True, condition
        )
    variance = _noise_variance(residuals, free.size)  # n > p >= free.size: dof = n - free.size
    to_natural = unscale[:, free]
    covariance = to_natural @ (variance * np.linalg.inv(information)) @ to_natural.T
    diagonal = np.where(fixed, np.nan, np.maximum(np.diag(covariance), 0.0))
    natural_theta = unscale @ theta
    errors = {}
    for i, spec in enumerate(law.params):
        se = math.sqrt(diagonal[i]) if math.isfinite(diagonal[i]) else math.nan
        # amplitude A = exp(log A): dA = A * d(log A)
        errors[spec.natural] = float(np.exp(natural_theta[i]) * se) if spec.is_log_amplitude else se
    note = (
        f"asymptotic sigma^2 (J^T J)^-1 of log residuals at the Huber fit, delta method "
        f"(J^T J condition number {condition:.3g})"
    )
    if fixed.any():
        names = ", ".join(spec.natural for spec, at in zip(law.params, fixed) if at)
        note += f"; held fixed at a bound (no standard error): {names}"
    return StandardErrors(errors, note, False, condition, diagonal)


def _candidates(law: Law, arrays: Mapping[str, np.ndarray]):
    """(description, points, runs, tokens) of every candidate extension, cheapest first: one
    new value of one variable (x2 .. x16 of its largest, half its smallest) at one corner run or
    across every existing combination of the others, and one new largest value (x2 .. x16) of
    every variable at once (the new rows of the grid)."""
    out = []

    def add(text, points):
        runs = len(next(iter(points.values())))
        tokens = float(sum(points[v].sum() for v in law.variables if v.startswith("d")))
        out.append((f"{text} ({runs} run{'s' if runs > 1 else ''})", points, runs, tokens))

    existing = {tuple(row) for row in np.column_stack([arrays[v] for v in law.variables])}
    for factor in (2.0, 4.0, 8.0, 16.0, 0.5):
        for variable in law.variables:
            others = [v for v in law.variables if v != variable]
            values = np.unique(arrays[variable])
            new = (values.max() if factor > 1 else values.min()) * factor
            if variable == "p" and new < 1.0:
                continue  # sparsity (total / active) is at least 1
            label = f"add {LABELS.get(variable, variable)} = {new:.3g}"
            if not others:
                add(label, {variable: np.array([new])})
                continue
            combos = np.unique(np.column_stack([arrays[v] for v in others]), axis=0)
            logs = np.log(combos).sum(axis=1)
            corner = combos[np.argmax(logs) if factor > 1 else np.argmin(logs)]
            where = ", ".join(f"{LABELS.get(v, v)} = {x:.3g}" for v, x in zip(others, corner))
            add(
                f"{label} at {where}", {variable: np.array([new]), **{v: np.array([x]) for v, x in zip(others, corner)}}
            )
            if len(combos) > 1:
                add(
                    f"{label} at every existing {'/'.join(LABELS.get(v, v) for v in others)}",
                    {variable: np.full(len(combos), new), **{v: combos[:, i] for i, v in enumerate(others)}},
                )
        if factor > 1 and len(law.variables) > 1:
            axes = [np.append(np.unique(arrays[v]), np.unique(arrays[v]).max() * factor) for v in law.variables]
            rows = [row for row in itertools.product(*axes) if row not in existing]
            if rows:
                grid = np.array(rows)
                add(
                    "add "
                    + ", ".join(f"{LABELS.get(v, v)} = {axis[-1]:.3g}" for v, axis in zip(law.variables, axes))
                    + " (the new rows of the grid)",
                    {v: grid[:, i] for i, v in enumerate(law.variables)},
                )
    return sorted(out, key=lambda entry: (entry[2], entry[3]))


def _shrunk(spec: ParamSpec, value: float, interval, ratio: float) -> list[float]:
    low, high = interval
    if spec.is_log_amplitude:
        centre = math.log(value)
        return [
            math.exp(centre - (centre - math.log(low)) * ratio),
            math.exp(centre + (math.log(high) - centre) * ratio),
        ]
    return [value - (value - low) * ratio, value + (high - value) * ratio]


def judged_matrix(law: Law, unscale: np.ndarray) -> np.ndarray:
    """Rows mapping fit-space theta to what each parameter is judged on: an amplitude's log
    term size at the centre of the data (its fit-space value: the natural A is the term at one
    token, many decades outside any data, and inherits every exponent's uncertainty), an
    exponent's natural value."""
    matrix = np.array(unscale, dtype=float)
    for i, spec in enumerate(law.params):
        if spec.is_log_amplitude:
            matrix[i] = np.eye(law.n_params)[i]
    return matrix


def _scaled_design(law: Law, points: Mapping[str, np.ndarray], log_ref: Mapping[str, float]) -> np.ndarray:
    """The fit-space design at ``points`` (variables scaled to their reference)."""
    return law.design({v: np.log(points[v]) - log_ref[v] for v in law.variables})


def _inverse_information(design: np.ndarray, theta: np.ndarray, free: np.ndarray) -> np.ndarray | None:
    """(J^T J)^-1 of the free parameters at the design's points; None where J^T J is singular
    or no parameter is free (every one at a bound)."""
    if free.size == 0:
        return None
    jac = log_jacobian(design, theta)[:, free]
    information = jac.T @ jac
    if np.linalg.cond(information) > MAX_CONDITION:
        return None
    return np.linalg.inv(information)


def suggest_extensions(
    law: Law,
    arrays: Mapping[str, np.ndarray],
    log_ref: Mapping[str, float],
    theta: np.ndarray,
    judged: np.ndarray,
    fixed: np.ndarray,
    variance: float,
    targets: Mapping[str, tuple[float, list[float] | None]],
    inverse: np.ndarray | None,
) -> dict[str, dict]:
    """For each target parameter (natural name -> (judged value, judged interval)), the cheapest
    candidate extension that identifies it, from the Fisher information at the candidate runs.
    ``judged``: :func:`judged_matrix`; ``inverse``: (J^T J)^-1 of the free parameters at the
    runs, or None where it is singular (see ``_inverse_information``)."""
    specs = {spec.natural: (i, spec) for i, spec in enumerate(law.params)}
    free = np.flatnonzero(~fixed)
    rows = judged[:, free]

    def natural_variance(inv):  # of what each parameter is judged on, per unit sigma^2
        return None if inv is None else np.diag(rows @ inv @ rows.T)

    current = natural_variance(inverse)
    candidates = _candidates(law, arrays)
    out = {}
    for name, (value, interval) in targets.items():
        index, spec = specs[name]
        if fixed[index]:
            out[name] = {
                "extension": None,
                "extension_note": "on a bound: the local Fisher information at the fit says nothing about it",
            }
            continue
        found = None
        for text, points, runs, tokens in candidates:
            combined = {v: np.concatenate([arrays[v], points[v]]) for v in law.variables}
            extended = natural_variance(_inverse_information(_scaled_design(law, combined, log_ref), theta, free))
            if extended is None:
                continue
            usable = (
                current is not None
                and interval is not None
                and current[index] > 0
                and all(np.isfinite(interval))
                and (not spec.is_log_amplitude or interval[0] > 0)
            )
            if usable:
                predicted = _shrunk(spec, value, interval, math.sqrt(extended[index] / current[index]))
            else:
                half = _Z95 * math.sqrt(max(variance, 0.0) * extended[index])
                predicted = (
                    [value * math.exp(-half), value * math.exp(half)]
                    if spec.is_log_amplitude
                    else [value - half, value + half]
                )
            ok, _ = identified(spec, value, predicted, None)
            if ok:
                found = {
                    "extension": text,
                    "runs": runs,
                    "tokens": tokens,
                    "predicted_interval": predicted,
                    "points": {v: [float(x) for x in points[v]] for v in law.variables},
                }
                break
        out[name] = found or {
            "extension": None,
            "extension_note": f"none of the {len(candidates)} candidate extensions identifies it",
        }
    return out


def identification(
    law: Law,
    theta: np.ndarray,
    scaled_samples: np.ndarray,
    unscale: np.ndarray,
    errors: StandardErrors,
    at_bound: Mapping[str, str],
    arrays: Mapping[str, np.ndarray],
    log_ref: Mapping[str, float],
    log_residuals: np.ndarray,
    profiled: Mapping[str, list[float]] | None = None,
    held: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Per parameter: identified or not and why, the interval it was judged on, and for those
    not identified the cheapest extension of the sweep that would identify them.

    Intervals: ``profiled`` (the profile-likelihood intervals of what each parameter is judged
    on, :mod:`upcycling.analysis.intervals`) where given; else percentiles of the bootstrap's
    fit-space samples mapped by :func:`judged_matrix`; without samples, the delta-method
    interval. ``held``: parameters the caller fixed (name -> why), reported as such.
    """
    held = dict(held or {})
    judged = judged_matrix(law, unscale)
    values = judged @ theta
    fixed = np.array([spec.natural in at_bound or spec.natural in held for spec in law.params])
    free = np.flatnonzero(~fixed)
    variance = _noise_variance(log_residuals, free.size)
    samples = np.asarray(scaled_samples, dtype=float).reshape(-1, law.n_params) @ judged.T

    def inverse_at_runs():
        return _inverse_information(_scaled_design(law, arrays, log_ref), theta, free)

    # without bootstrap samples, delta-method intervals (standard_errors found J^T J regular)
    delta_method = not len(samples) and errors.log_variance is not None
    inverse = inverse_at_runs() if delta_method else None
    if inverse is not None:
        rows = judged[:, free]
        covariance = variance * rows @ inverse @ rows.T
    out, targets = {}, {}
    for i, spec in enumerate(law.params):
        name = spec.natural
        if name in held:
            out[name] = {
                "identified": False,
                "why": f"held fixed: {held[name]}",
                "judged_on": "its value",
                "value": float(math.exp(values[i]) if spec.is_log_amplitude else values[i]),
                "interval": None,
                "held": True,
            }
            continue
        if profiled is not None and name in profiled:
            interval = [float(v) for v in profiled[name]]
            value = float(math.exp(values[i]) if spec.is_log_amplitude else values[i])
        elif len(samples):
            interval = [float(v) for v in np.percentile(samples[:, i], [2.5, 97.5])]
        elif inverse is not None and not fixed[i]:
            half = _Z95 * math.sqrt(max(covariance[i, i], 0.0))
            interval = [values[i] - half, values[i] + half]
        else:
            interval = None
        if profiled is None or name not in profiled:
            value = float(values[i])
            if spec.is_log_amplitude:
                value = math.exp(value)
                interval = [math.exp(v) for v in interval] if interval is not None else None
        ok, why = identified(spec, value, interval, at_bound.get(name))
        where = "its term at the centre of the data" if spec.is_log_amplitude and name != "E" else "its value"
        out[name] = {
            "identified": ok,
            "why": (f"{where}: {why}" if why and not at_bound.get(name) else why),
            "judged_on": where,
            "value": value,
            "interval": interval,
        }
        if not ok and name == "E":
            out[name]["separable"] = False
            out[name]["note"] = (
                "these runs cannot separate E from the power terms (E's interval reaches 0 or is unbounded, "
                "or E sits on its bound); the extension below names runs that would, or share the dense "
                "fit's E (fit.irreducible: shared_dense)"
            )
        if not ok:
            targets[name] = (value, interval)
    if targets:
        for name, suggestion in suggest_extensions(
            law,
            arrays,
            log_ref,
            theta,
            judged,
            fixed,
            variance,
            targets,
            inverse if delta_method else inverse_at_runs(),
        ).items():
            out[name].update(suggestion)
    return out
