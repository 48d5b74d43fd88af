"""The objective and the optimisers of the fits (:mod:`upcycling.analysis.fitting` says the method).

The objective is the sum of Huber losses of the residuals of log loss, with the law's prediction a
logsumexp of terms linear in the parameters (exact gradients and Jacobians, :class:`LogProblem`).
:func:`optimize` refines the best points of the grid of initial values by trust-region least
squares with scipy's Huber loss, polishes the best, and alternates with L-BFGS-B (lmfit) on the
same objective until neither improves on the other (``solvers_agree``).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import lmfit
import numpy as np
from scipy.optimize import least_squares

from upcycling.analysis import diagnostics
from upcycling.analysis.laws import Law

# L-BFGS-B stops when the objective changes by less than ftol * max(|f|, 1): the objective is
# a sum of Huber losses of order 1e-6..1e-2, so ftol must be far below the default to converge.
_LBFGSB_OPTIONS = dict(maxiter=20000, maxfun=40000, ftol=1e-16, gtol=1e-13, maxcor=20)
_LSQ_TOLERANCES = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=20000)
# Screening the starts, and bootstrap refits: coefficients far more precise than their spread
# across resamples, not at machine precision. (With a tiny Huber delta the objective is nearly
# L1, and in a degenerate valley the trust region crawls: the evaluation cap bounds that.)
_SCREEN_TOLERANCES = dict(ftol=1e-10, xtol=1e-10, gtol=1e-10, max_nfev=1000)
# Bootstrap refits start at the fit: a well-identified law converges in tens of evaluations; in
# a flat valley (a baseline that does not describe the data) the cap stops the crawl where the
# objective no longer changes, which is the valley's spread the bootstrap measures.
REFIT_TOLERANCES = dict(_SCREEN_TOLERANCES, max_nfev=200)
_AGREEMENT = 1e-6  # relative objective difference at which two solvers "agree"
_GRID_CHUNK = 2048  # grid points evaluated per vectorised block (bounds memory)


def huber(residuals: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss: r^2 / 2 for |r| <= delta, delta * (|r| - delta / 2) beyond."""
    r = np.abs(np.asarray(residuals, dtype=float))
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


# --------------------------------------------------------------------------------------------
# The objective and the optimisers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogProblem:
    """Huber regression of log loss on a law's logsumexp prediction (scaled variables)."""

    design: np.ndarray  # (points, terms, params)
    log_loss: np.ndarray  # (points,)
    delta: float
    # (points, terms): a constant added to every term; a profile or a parameter held fixed
    # (E shared with the dense fit) moves part of theta into it (see analysis/profile.py)
    offset: np.ndarray | None = None

    def _terms(self, theta):
        terms = self.design @ theta
        return terms if self.offset is None else terms + self.offset

    def _log_prediction(self, theta):
        terms = self._terms(theta)
        peak = terms.max(axis=1)
        return peak + np.log(np.exp(terms - peak[:, None]).sum(axis=1))

    @property
    def objective_floor(self) -> float:
        """Objective differences below this are noise: residuals of ~1e-6 * delta each."""
        return 0.5 * self.log_loss.size * (1e-6 * self.delta) ** 2

    def residuals(self, theta):
        return self._log_prediction(theta) - self.log_loss

    def jacobian(self, theta):
        return diagnostics.log_jacobian(self.design, theta, self.offset)

    def objective(self, theta):
        return float(huber(self.residuals(theta), self.delta).sum())

    def gradient(self, theta):
        return self.jacobian(theta).T @ np.clip(self.residuals(theta), -self.delta, self.delta)

    def objectives(self, thetas):
        """Objective at many parameter vectors at once (grid search)."""
        out = np.empty(len(thetas))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for start in range(0, len(thetas), _GRID_CHUNK):
                block = thetas[start : start + _GRID_CHUNK]
                terms = np.einsum("nmp,gp->gnm", self.design, block)
                if self.offset is not None:
                    terms = terms + self.offset[None]
                peak = terms.max(axis=2)
                log_pred = peak + np.log(np.exp(terms - peak[..., None]).sum(axis=2))
                out[start : start + _GRID_CHUNK] = huber(log_pred - self.log_loss, self.delta).sum(axis=1)
        return np.where(np.isfinite(out), out, np.inf)

    def subset(self, index):
        offset = None if self.offset is None else self.offset[index]
        return LogProblem(self.design[index], self.log_loss[index], self.delta, offset)


@dataclass
class Optimum:
    theta: np.ndarray
    objective: float
    details: dict


def _inside(theta: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``theta`` clipped inside the bounds by 1e-9 of their width: the start of both solvers
    (lmfit maps bounded parameters through a sine; exactly at a bound the gradient vanishes)."""
    margin = 1e-9 * (bounds[:, 1] - bounds[:, 0])
    return np.clip(np.asarray(theta, dtype=float), bounds[:, 0] + margin, bounds[:, 1] - margin)


def _parameters(law: Law, theta: np.ndarray, bounds: np.ndarray) -> lmfit.Parameters:
    params = lmfit.Parameters()
    # positional names: the solvers also run on reduced problems (profiles, E held fixed)
    for i, (value, (low, high)) in enumerate(zip(_inside(theta, bounds), bounds)):
        params.add(f"p{i}", value=float(value), min=low, max=high)
    return params


def _vector(law: Law, params: lmfit.Parameters) -> np.ndarray:
    return np.array([params[f"p{i}"].value for i in range(len(params))])


def _lbfgsb(law, problem, theta0, bounds):
    minimizer = lmfit.Minimizer(
        lambda p: problem.objective(_vector(law, p)), _parameters(law, theta0, bounds), calc_covar=False
    )
    result = minimizer.minimize(
        method="lbfgsb", jac=lambda p: problem.gradient(_vector(law, p)), options=dict(_LBFGSB_OPTIONS)
    )
    theta = _vector(law, result.params)
    return theta, problem.objective(theta), str(result.message)


def _least_squares(law, problem, theta0, bounds, tolerances=None):
    """Trust-region reflective least squares with scipy's Huber loss, from theta0.

    scipy's cost with loss='huber' and f_scale=delta is sum(huber(r, delta)) exactly, the
    objective that L-BFGS-B minimises. Called on scipy directly (lmfit's ``least_squares``
    wraps the same function): the refits run thousands of times, and the wrapper's parameter
    bookkeeping cost more than the model.
    """
    result = least_squares(
        problem.residuals,
        _inside(theta0, bounds),
        jac=problem.jacobian,
        bounds=(bounds[:, 0], bounds[:, 1]),
        method="trf",
        loss="huber",
        f_scale=problem.delta,
        **(tolerances or _LSQ_TOLERANCES),
    )
    return result.x, problem.objective(result.x), str(result.message)


def grid_of_starts(law: Law, bounds: np.ndarray) -> np.ndarray:
    grid = np.array(list(itertools.product(*(spec.grid for spec in law.params))), dtype=float)
    inside = np.all((grid > bounds[:, 0]) & (grid < bounds[:, 1]), axis=1)
    return grid[inside]


def optimize(
    law: Law,
    problem: LogProblem,
    candidates: np.ndarray,
    n_starts: int,
    bounds: np.ndarray,
    extra_starts=(),
    verify: bool = True,
    tolerances=_SCREEN_TOLERANCES,
) -> Optimum:
    """Best local optimum from the n_starts best candidates (and the extra starts).

    Each start is refined by trust-region least squares with the Huber loss. With ``verify``
    the best is polished to tight tolerances, then L-BFGS-B (a different algorithm on the same
    objective) restarts from it, the two alternating until neither improves on the other by
    more than 1e-6 relative.
    """
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
        runs = sorted(
            (_least_squares(law, problem, np.asarray(theta0, dtype=float), bounds, tolerances) for theta0 in starts),
            key=lambda run: run[1],
        )
        theta, objective, lsq_message = runs[0]
        details = {
            "starts": len(starts),
            # starts reaching the best objective to 1e-6 relative: few of them flag a rugged
            # landscape (informative, not a requirement)
            "agreeing_starts": int(
                sum(abs(run[1] - objective) <= _AGREEMENT * (abs(objective) + problem.objective_floor) for run in runs)
            ),
        }
        if not verify:
            return Optimum(theta, objective, {**details, "least_squares_message": lsq_message})
        polished = _least_squares(law, problem, theta, bounds, _LSQ_TOLERANCES)
        if polished[1] <= objective:
            theta, objective, lsq_message = polished
        for rounds in range(1, 4):  # noqa: B007 (reported after the loop)
            check = _lbfgsb(law, problem, theta, bounds)
            gain = (objective - check[1]) / (abs(objective) + problem.objective_floor)
            if gain <= _AGREEMENT:
                break
            # L-BFGS-B found lower ground: continue from there with the other solver
            polished = _least_squares(law, problem, check[0], bounds, _LSQ_TOLERANCES)
            theta, objective, lsq_message = min(polished, check, key=lambda run: run[1])
    details.update(
        {
            "lbfgsb_message": check[2],
            "least_squares_message": lsq_message,
            "verify_rounds": rounds,
            # relative gain of L-BFGS-B over the least-squares optimum: ~0 at a true minimum
            "lbfgsb_relative_gain": gain,
            "solvers_agree": bool(gain <= _AGREEMENT),
        }
    )
    return Optimum(theta, objective, details)
