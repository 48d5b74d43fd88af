"""Profile-likelihood intervals that respect the bounds (the fits' 95% intervals).

A quantity of a fit is a linear function ``c @ theta`` of the fit-space parameters (a natural
exponent, an amplitude's log term at the centre of the data, alpha1 in a token unit, alpha2 -
alpha1 ...). Its profile at a value v is the Huber objective minimised over every other
direction with ``c @ theta = v`` held: one parameter (the pivot) is solved from the constraint,
so the reduced problem keeps the laws' log-sum-exp structure, linear in the remaining
parameters, with exact Jacobians, and every other parameter keeps its bounds. E (and every
amplitude) stays free over its whole physical range: a fit that ended with E -> 0 moves E up
again wherever that fits the runs as well, so the interval of alpha3 includes what E > 0 allows.

Threshold. The profile statistic is ``2 kappa (H(v) - H_min)``, H the Huber objective, against
``t_{n-p}(0.975)^2`` (the small-sample version of chi^2_1(0.95) = 3.84; p the free parameters).
``kappa = E[psi'] / E[psi^2]`` (psi = the Huber influence function, clip(r, -delta, delta)) is
the factor that makes the statistic the likelihood-ratio one for an M-estimator, evaluated for
Gaussian log residuals of the fit's variance sigma^2 = RSS / (n - p): with delta above the
noise it is 1 / sigma^2 (the least-squares profile), with delta far below it the L1 one.

Ends. Each side is searched outward from the estimate (steps doubling from the delta-method
standard error), then refined by regula falsi on the square root of the statistic. A side is
*open* (the interval unbounded there, written +-inf) when the statistic stays below the
threshold until the search leaves the parameters' numerical limits, or another parameter is
pushed onto one of its numerical limits (a log-amplitude's lower limit is physical: the term
vanishing, E -> 0, is a valid part of the profile, not a clip).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from upcycling.analysis.optimize import LogProblem

__all__ = ["ProfileInterval", "Profiler", "objective_scale", "threshold"]

_MAX_DOUBLINGS = 14  # 2^14 standard errors from the estimate: beyond, the side is open
_MIN_STEP = 1e-3  # first step, relative to max(|value|, 1), at least
_MAX_HALVINGS = 30  # a first step beyond the end: halve it until inside
_REFINE = 6  # regula-falsi steps on each end, at most
_END_TOLERANCE = 0.03  # |statistic / threshold - 1| at which an end is found
_ITERATIONS = 200  # damped IRLS steps of one profile point, at most
_STATISTIC_TOLERANCE = 1e-4  # an IRLS step changing the statistic less than this: converged
_REVIVE_SHARES = (0.5,)  # a vanished term restarted at these shares of the smallest loss
_LIMIT_TOLERANCE = 1e-6  # distance to a numerical limit, relative to its width, that counts as on it
_SIGMA_FLOOR = 1e-9  # noiseless data: keep the statistic finite


def objective_scale(log_residuals: np.ndarray, n_free: int, delta: float) -> float:
    """kappa = E[psi'] / E[psi^2] for Gaussian residuals of the fit's variance (module docstring)."""
    n = log_residuals.size
    sigma = max(math.sqrt(float(log_residuals @ log_residuals) / max(n - n_free, 1)), _SIGMA_FLOOR)
    a = delta / sigma
    inside = float(special.erf(a / math.sqrt(2.0)))  # P(|r| < delta)
    density = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    psi2 = sigma**2 * (inside - 2 * a * density) + delta**2 * (1 - inside)
    return inside / max(psi2, np.finfo(float).tiny)


def threshold(n_points: int, n_free: int, level: float = 0.95) -> float:
    """t_{n-p}((1 + level) / 2)^2: the profile statistic's bound for a 95% interval."""
    return float(stats.t.ppf(0.5 + level / 2, max(n_points - n_free, 1)) ** 2)


def _minimize(
    problem: LogProblem, phi: np.ndarray, low: np.ndarray, high: np.ndarray, tolerance: float
) -> tuple[np.ndarray, float]:
    """Minimise the Huber objective within the box by damped iteratively reweighted Gauss-Newton
    (weights psi(r) / r: the quadratic that majorises the Huber loss at the current residuals;
    Levenberg-Marquardt damping, every step kept only if it lowers the objective). The
    profile's hundreds of small solves: tens of times cheaper than scipy's trust region."""
    delta = problem.delta
    objective = problem.objective(phi)
    damping = 1e-6
    for _ in range(_ITERATIONS):
        residuals = problem.residuals(phi)
        jacobian = problem.jacobian(phi)
        size = np.abs(residuals)
        weights = np.where(size <= delta, 1.0, delta / np.maximum(size, 1e-300))
        gradient = jacobian.T @ np.clip(residuals, -delta, delta)
        hessian = (jacobian * weights[:, None]).T @ jacobian
        # parameters on a bound that the gradient pushes outward stay there (projected Newton)
        width = 1e-9 * (high - low)
        free = ~(((phi <= low + width) & (gradient > 0)) | ((phi >= high - width) & (gradient < 0)))
        if not free.any():
            return phi, objective
        sub_hessian = hessian[np.ix_(free, free)]
        scale = np.diag(sub_hessian).copy() + 1e-12 * (np.trace(sub_hessian) + 1e-300)
        while damping < 1e10:
            try:
                step = np.zeros_like(phi)
                step[free] = np.linalg.solve(sub_hessian + damping * np.diag(scale), -gradient[free])
            except np.linalg.LinAlgError:
                damping *= 10.0
                continue
            trial = np.clip(phi + step, low, high)
            value = problem.objective(trial)
            if value < objective:
                break
            damping *= 10.0
        else:
            return phi, objective
        gain = objective - value
        phi, objective = trial, value
        damping = max(damping / 10.0, 1e-9)
        if gain <= tolerance:
            break
    return phi, objective


@dataclass(frozen=True)
class ProfileInterval:
    value: float  # c @ theta at the fit
    low: float  # -inf when open
    high: float  # +inf when open
    low_open: bool
    high_open: bool
    evaluations: int

    @property
    def bounded(self) -> bool:
        return not (self.low_open or self.high_open)

    def as_list(self) -> list[float]:
        return [self.low, self.high]


class Profiler:
    """Profiles of linear quantities ``c @ theta`` of one fitted problem.

    ``physical_low``: parameters whose lower bound is physical (log amplitudes: the term
    vanishes), which a profile may reach without being clipped. ``fixed``: parameters held at
    their value (E shared with the dense fit), which no profile moves.
    """

    def __init__(
        self,
        problem: LogProblem,
        theta: np.ndarray,
        bounds: np.ndarray,
        physical_low: np.ndarray,
        kappa: float,
        bound: float,
        covariance: np.ndarray | None = None,
        fixed: np.ndarray | None = None,
    ):
        self.problem, self.theta, self.bounds = problem, np.asarray(theta, dtype=float), np.asarray(bounds, dtype=float)
        self.physical_low = np.asarray(physical_low, dtype=bool)
        self.fixed = np.zeros(theta.size, dtype=bool) if fixed is None else np.asarray(fixed, dtype=bool)
        self.kappa, self.bound, self.covariance = float(kappa), float(bound), covariance
        self.minimum = problem.objective(self.theta)
        self.tolerance = _STATISTIC_TOLERANCE / (2.0 * self.kappa)  # in objective units

    # ---- the reduced problem at c @ theta = v ----------------------------------------------

    def _pivot(self, c: np.ndarray) -> int:
        weights = np.where(self.fixed, 0.0, np.abs(c))
        return int(np.argmax(weights))

    def _reduction(self, c: np.ndarray, pivot: int):
        k = c.size
        others = [j for j in range(k) if j != pivot]
        basis = np.zeros((k, k - 1))
        for col, j in enumerate(others):
            basis[j, col] = 1.0
            basis[pivot, col] = -c[j] / c[pivot]
        unit = np.zeros(k)
        unit[pivot] = 1.0 / c[pivot]
        design = np.einsum("nmp,pq->nmq", self.problem.design, basis)
        per_value = self.problem.design @ unit  # (points, terms): the offset per unit of v
        base = self.problem.offset
        return others, basis, unit, design, per_value, base

    def _solve(self, reduction, v: float, phi0: np.ndarray):
        others, basis, unit, design, per_value, base = reduction
        offset = v * per_value if base is None else base + v * per_value
        sub = LogProblem(design, self.problem.log_loss, self.problem.delta, offset)
        low, high = self.bounds[others, 0], self.bounds[others, 1]
        margin = 1e-9 * (high - low)
        start = np.clip(phi0, low + margin, high - margin)
        starts = [start]
        # a vanished term (E -> 0 at the fit) has no gradient: the solver alone never revives
        # it, so the profile also starts with each vanished amplitude at a share of the loss
        vanished = [col for col, j in enumerate(others) if self.physical_low[j] and start[col] - low[col] < 1.0]
        for share in _REVIVE_SHARES if vanished else ():
            revived = start.copy()
            revived[vanished] = np.log(share) + float(self.problem.log_loss.min())
            starts.append(np.clip(revived, low + margin, high - margin))
        best: tuple[float, np.ndarray] | None = None
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            for initial in starts:
                phi, objective = _minimize(sub, initial, low, high, self.tolerance)
                if best is None or objective < best[0]:
                    best = (objective, phi)
        assert best is not None  # at least the warm start
        objective, phi = best
        theta = basis @ phi + v * unit
        statistic = 2.0 * self.kappa * (objective - self.minimum)
        return statistic, phi, self._clipped(theta)

    def _clipped(self, theta: np.ndarray) -> bool:
        """Whether a parameter sits on (or, the pivot, beyond) a numerical limit."""
        low, high = self.bounds[:, 0], self.bounds[:, 1]
        tolerance = _LIMIT_TOLERANCE * (high - low)
        on_low = (theta - low <= tolerance) & ~self.physical_low
        on_high = high - theta <= tolerance
        return bool(np.any((on_low | on_high) & ~self.fixed))

    # ---- the interval ----------------------------------------------------------------------

    def _step(self, c: np.ndarray, value: float) -> float:
        if self.covariance is not None:
            variance = float(c @ self.covariance @ c)
            if math.isfinite(variance) and variance > 0:
                return math.sqrt(variance * self.bound)
        return 0.05 * max(abs(value), 0.1)

    def _narrow(self, reduction, v: float, inside: tuple, outside: tuple) -> tuple[tuple, tuple]:
        """The bracket (inside, outside) of the threshold crossing with the profile at ``v`` in
        place of the end on its side of the threshold."""
        statistic, phi, _ = self._solve(reduction, v, inside[2])
        point = (v, statistic, phi)
        return (inside, point) if statistic > self.bound else (point, outside)

    def interval(self, c: np.ndarray, physical_floor: float | None = None) -> ProfileInterval:
        """The 95% profile interval of ``c @ theta``; ``physical_floor``: a lower limit of the
        quantity that is physical (a log amplitude's), reached without the side being open."""
        c = np.asarray(c, dtype=float)
        value = float(c @ self.theta)
        if not np.any(np.where(self.fixed, 0.0, np.abs(c)) > 0):
            return ProfileInterval(value, value, value, False, False, 0)  # held fixed
        pivot = self._pivot(c)
        reduction = self._reduction(c, pivot)
        # a parameter profiled on its own stops at its numerical limits (beyond them: open)
        alone = np.count_nonzero(np.where(self.fixed, 0.0, c)) == 1
        limits = sorted(self.bounds[pivot] * c[pivot]) if alone else [-math.inf, math.inf]
        phi_hat = self.theta[reduction[0]]
        # a parameter on a bound has no curvature there: the first step from the scale of its value
        step = max(self._step(c, value), _MIN_STEP * max(abs(value), 1.0))
        ends, opens, evaluations = [], [], 0
        for side in (-1.0, 1.0):
            inside = (value, 0.0, phi_hat)
            outside = None
            open_side = True
            distance = step
            for _ in range(_MAX_DOUBLINGS):
                v = value + side * distance
                at_floor = side < 0 and physical_floor is not None and v <= physical_floor
                if at_floor and physical_floor is not None:
                    v = physical_floor
                at_limit = not at_floor and not limits[0] < v < limits[1]
                if at_limit:
                    v = limits[0] if side < 0 else limits[1]
                statistic, phi, clipped = self._solve(reduction, v, inside[2])
                clipped = clipped or at_limit
                evaluations += 1
                if statistic > self.bound:
                    outside = (v, statistic, phi)
                    open_side = False
                    break
                if clipped:
                    break  # still inside at a numerical limit: unbounded on this side
                inside = (v, statistic, phi)
                if at_floor:
                    open_side = False
                    break
                distance *= 2.0
            if outside is None:
                ends.append(inside[0] if not open_side else side * math.inf)
                opens.append(open_side)
                continue
            for _ in range(_MAX_HALVINGS):  # a first step far too long (a poor standard error)
                if inside[0] != value:
                    break
                inside, outside = self._narrow(reduction, value + 0.5 * (outside[0] - value), inside, outside)
                evaluations += 1
            for _ in range(_REFINE):  # regula falsi on sqrt(statistic), ~linear in v
                if min(abs(end[1] / self.bound - 1) for end in (inside, outside)) < _END_TOLERANCE:
                    break
                a, b = math.sqrt(max(inside[1], 0.0)), math.sqrt(outside[1])
                target = math.sqrt(self.bound)
                weight = (target - a) / (b - a) if b > a else 0.5
                v = inside[0] + min(max(weight, 0.05), 0.95) * (outside[0] - inside[0])
                inside, outside = self._narrow(reduction, v, inside, outside)
                evaluations += 1
            a, b = math.sqrt(max(inside[1], 0.0)), math.sqrt(outside[1])
            weight = (math.sqrt(self.bound) - a) / (b - a) if b > a else 0.5
            ends.append(inside[0] + weight * (outside[0] - inside[0]))
            opens.append(False)
        return ProfileInterval(value, ends[0], ends[1], opens[0], opens[1], evaluations)
