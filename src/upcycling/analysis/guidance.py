"""When to stop upcycling: the D2 beyond which training the MoE from scratch with the same
compute gives a lower loss.

Public functions:

- ``upcycled_loss_fn(fit, n1=None) -> f(d1, d2)``: loss of a fitted dataset or joint law
- ``scratch_loss_fn(fit, n2=None) -> f(d)``: loss of a fitted from-scratch MoE law
  (``chinchilla_scratch`` at N = n2 active parameters, or ``scratch_power`` at its own size)
- ``scratch_tokens(d1, d2, n1, n2, count_sunk_cost) -> D_s``: equal-compute scratch tokens
- ``break_even_d2(upcycled, scratch, d1, *, n1, n2, count_sunk_cost, d2_range, grid_points)
  -> BreakEven``: numeric (log grid + brentq)
- ``crossings(upcycled, scratch, d1, *, n1, n2, count_sunk_cost, d2_range, grid_points)
  -> list[dict]``: every D2 in range where the better option changes (brentq each)
- ``break_even_samples(upcycled_fit, scratch_fit, d1, *, n1, n2, count_sunk_cost, d2_range,
  grid_points) -> np.ndarray``: D2* of every pair of bootstrap samples (vectorised; a crossing
  located by linear interpolation of the loss difference in log D2)
- ``search_range(d2_values, decades=1.0) -> (low, high)``: the runs' D2 range and one decade
  of extrapolation on each side
- ``closed_form_break_even_d2(upcycled_fit, scratch_fit, d1, *, n1=None, n2=None,
  count_sunk_cost=False) -> float | None``: where a closed form exists
- ``guidance_table(upcycled_fit, scratch_fit, d1_values, *, n1, n2, d2_range) -> list[dict]``
- ``equal_compute_curves(upcycled_fit, scratch_fit, d1, d2_values, *, n1, n2,
  count_sunk_cost) -> dict[str, np.ndarray]``

Compute accounting (C = 6 N D, N = active parameters): upcycling spends 6 N2 D2 on the MoE
stage, after 6 N1 D1 on the dense model. The from-scratch MoE (same architecture, N2 active
parameters) gets the same compute: 6 N2 D_s = 6 N2 D2 + (6 N1 D1 if the dense cost is counted,
else 0). The dense cost is "sunk" (not counted) when the dense checkpoint exists anyway.

Closed form. At fixed D1 the upcycled law is c_u + a_u D2^-gamma, with gamma = alpha2 -
alpha3 ln D1, a_u = A D1^-alpha1, c_u = E (+ B N1^-beta2 for the joint law); the scratch law
is c_s + b_s D^-beta (c_s = E_s + A_s N2^-alpha, b_s = B_s). Without the sunk cost D_s = D2 and
the difference g(D2) = (c_u - c_s) + a_u D2^-gamma - b_s D2^-beta is a sum of two power laws
and a constant, solvable in closed form when
  (i) c_u = c_s (same irreducible loss): D2* = (b_s / a_u)^(1 / (beta - gamma)), a crossing
      from "upcycle better" to "scratch better" when beta > gamma;
  (ii) gamma = beta: D2* = ((b_s - a_u) / (c_u - c_s))^(1 / beta), a crossing when
      c_u > c_s and b_s > a_u.
With the sunk cost counted, D_s = D2 + N1 D1 / N2 and no closed form exists in general.

Conventions for D2*: the smallest D2 such that from-scratch training is at least as good for
every larger D2 in range; ``inf`` when upcycling is still better at the top of the range;
``0.0`` when from-scratch training is better over the whole range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
from scipy.optimize import brentq

from upcycling.analysis.laws import get_law

__all__ = [
    "DEFAULT_D2_RANGE",
    "BreakEven",
    "break_even_d2",
    "break_even_samples",
    "closed_form_break_even_d2",
    "crossings",
    "equal_compute_curves",
    "guidance_table",
    "scratch_loss_fn",
    "scratch_tokens",
    "search_range",
    "upcycled_loss_fn",
]

DEFAULT_D2_RANGE = (1.0e3, 1.0e16)  # tokens: a wide default for callers that know no data range
UPCYCLED_LAWS = ("dataset", "dataset_no_interaction", "joint", "joint_no_interaction")
SCRATCH_LAWS = ("chinchilla_scratch", "chinchilla_dense", "scratch_power")


class FittedLaw(Protocol):
    """What guidance needs of a fit (a :class:`upcycling.analysis.fitting.FitResult` has it)."""

    law: str
    params: Mapping[str, float]


@dataclass(frozen=True)
class BreakEven:
    d1: float
    d2_star: float  # inf: upcycling better up to the range's end; 0: scratch better everywhere
    count_sunk_cost: bool
    status: str  # "crossing" | "upcycle_better_in_range" | "scratch_better_in_range"
    d2_range: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Losses of the two options
# --------------------------------------------------------------------------------------------


def _power_form_upcycled(fit: FittedLaw, d1: float, n1: float | None):
    """(c_u, a_u, gamma): the upcycled law at fixed D1 as c_u + a_u * D2^-gamma."""
    p = fit.params
    alpha3 = p.get("alpha3", 0.0)
    gamma = p["alpha2"] - alpha3 * math.log(d1)
    a_u = p["A"] * d1 ** (-p["alpha1"])
    c_u = p["E"]
    if "B" in p and "beta2" in p:  # joint law: the dense-size term is a constant here
        if n1 is None:
            raise ValueError(f"law {fit.law!r} needs the dense model size n1")
        c_u += p["B"] * n1 ** (-p["beta2"])
    return c_u, a_u, gamma


def _power_form_scratch(fit: FittedLaw, n2: float | None):
    """(c_s, b_s, beta): the scratch law at fixed N as c_s + b_s * D^-beta."""
    p = fit.params
    c_s = p["E"]
    if "A" in p and "alpha" in p:  # Chinchilla: the size term is a constant at fixed N
        if n2 is None:
            raise ValueError(f"law {fit.law!r} needs the active parameters n2")
        c_s += p["A"] * n2 ** (-p["alpha"])
    return c_s, p["B"], p["beta"]


def upcycled_loss_fn(fit: FittedLaw, n1: float | None = None) -> Callable:
    """Loss of the upcycled MoE, f(d1, d2), from a fitted dataset or joint law."""
    if fit.law not in UPCYCLED_LAWS:
        raise ValueError(f"law {fit.law!r} is not an upcycled-MoE law ({UPCYCLED_LAWS})")
    law = get_law(fit.law)
    if "n1" in law.variables and n1 is None:
        raise ValueError(f"law {fit.law!r} needs the dense model size n1")

    def loss(d1, d2):
        sizes = {"n1": n1} if "n1" in law.variables else {}
        return law.predict(fit.params, d1=d1, d2=d2, **sizes)

    return loss


def scratch_loss_fn(fit: FittedLaw, n2: float | None = None) -> Callable:
    """Loss of the MoE trained from scratch, f(d), at n2 active parameters."""
    if fit.law not in SCRATCH_LAWS:
        raise ValueError(f"law {fit.law!r} is not a from-scratch law ({SCRATCH_LAWS})")
    law = get_law(fit.law)
    if "n" in law.variables and n2 is None:
        raise ValueError(f"law {fit.law!r} needs the active parameters n2")

    def loss(d):
        sizes = {"n": n2} if "n" in law.variables else {}
        return law.predict(fit.params, d=d, **sizes)

    return loss


def scratch_tokens(d1, d2, n1: float, n2: float, count_sunk_cost: bool):
    """Tokens D_s of a from-scratch MoE (n2 active params) with the upcycled run's compute."""
    d2 = np.asarray(d2, dtype=float)
    if not count_sunk_cost:
        return d2
    return d2 + n1 * np.asarray(d1, dtype=float) / n2


# --------------------------------------------------------------------------------------------
# Break-even D2
# --------------------------------------------------------------------------------------------


def _scan(
    upcycled: Callable,
    scratch: Callable,
    d1: float,
    n1: float,
    n2: float,
    count_sunk_cost: bool,
    low: float,
    high: float,
    grid_points: int,
):
    """(difference, log_grid, diff): L_up - L_scratch at equal compute as a function of log D2,
    a log grid of D2 from low to high, and the difference on it."""

    def difference(log_d2):
        d2 = np.exp(log_d2)
        d_s = scratch_tokens(d1, d2, n1, n2, count_sunk_cost)
        return upcycled(d1, d2) - scratch(d_s)

    log_grid = np.linspace(math.log(low), math.log(high), grid_points)
    return difference, log_grid, difference(log_grid)


def _root(difference: Callable, log_grid: np.ndarray, i: int) -> float:
    """The D2 where ``difference`` changes sign between grid points i and i + 1 (brentq)."""
    root = brentq(lambda x: float(difference(x)), log_grid[i], log_grid[i + 1], xtol=1e-13, rtol=1e-14, maxiter=200)
    return float(math.exp(root))


def break_even_d2(
    upcycled: Callable,
    scratch: Callable,
    d1: float,
    *,
    n1: float,
    n2: float,
    count_sunk_cost: bool,
    d2_range: tuple[float, float] = DEFAULT_D2_RANGE,
    grid_points: int = 600,
) -> BreakEven:
    """Numeric D2*: the sign of L_up - L_scratch on a log grid of D2, refined by brentq.

    ``upcycled(d1, d2)`` and ``scratch(d)`` are loss functions (see ``upcycled_loss_fn``).
    """
    low, high = (float(v) for v in d2_range)
    if not 0 < low < high:
        raise ValueError(f"d2_range must satisfy 0 < low < high, got {d2_range}")

    difference, log_grid, diff = _scan(upcycled, scratch, d1, n1, n2, count_sunk_cost, low, high, grid_points)
    upcycle_better = diff < 0
    result = functools.partial(BreakEven, d1=float(d1), count_sunk_cost=bool(count_sunk_cost), d2_range=(low, high))
    if upcycle_better[-1]:
        return result(d2_star=math.inf, status="upcycle_better_in_range")
    if not upcycle_better.any():
        return result(d2_star=0.0, status="scratch_better_in_range")
    # the last grid point where upcycling is better; scratch is at least as good after it
    last = int(np.flatnonzero(upcycle_better)[-1])
    return result(d2_star=_root(difference, log_grid, last), status="crossing")


def crossings(
    upcycled: Callable,
    scratch: Callable,
    d1: float,
    *,
    n1: float,
    n2: float,
    count_sunk_cost: bool,
    d2_range: tuple[float, float] = DEFAULT_D2_RANGE,
    grid_points: int = 600,
) -> list[dict[str, float | str]]:
    """Every D2 in range where the sign of L_up - L_scratch changes: ``{"d2", "better_after"}``
    (``"scratch"`` or ``"upcycle"``), in increasing D2. With the dense cost counted there can be
    two: from scratch better at small D2 (the dense tokens it gets), upcycling in between."""
    low, high = (float(v) for v in d2_range)
    difference, log_grid, diff = _scan(upcycled, scratch, d1, n1, n2, count_sunk_cost, low, high, grid_points)
    sign = np.sign(diff)
    return [
        {"d2": _root(difference, log_grid, int(i)), "better_after": "scratch" if sign[i + 1] > 0 else "upcycle"}
        for i in np.flatnonzero(sign[:-1] * sign[1:] < 0)
    ]


def search_range(d2_values, decades: float = 1.0) -> tuple[float, float]:
    """The runs' D2 range widened by ``decades`` of extrapolation on each side."""
    values = np.asarray(d2_values, dtype=float)
    return float(values.min() / 10**decades), float(values.max() * 10**decades)


def _sample_params(fit, count: int) -> dict[str, np.ndarray]:
    samples = fit.bootstrap.get("samples") or {}
    return {name: np.asarray(values[:count], dtype=float)[:, None] for name, values in samples.items()}


def break_even_samples(
    upcycled_fit,
    scratch_fit,
    d1: float,
    *,
    n1: float,
    n2: float,
    count_sunk_cost: bool,
    d2_range: tuple[float, float] = DEFAULT_D2_RANGE,
    grid_points: int = 400,
) -> np.ndarray:
    """D2* (same conventions as :func:`break_even_d2`) of each pair of bootstrap samples of the
    two fits (the i-th of each: they are independent resamples), vectorised over samples."""
    up_samples = upcycled_fit.bootstrap.get("samples") or {}
    scratch_samples = scratch_fit.bootstrap.get("samples") or {}
    count = min((len(v) for v in (*up_samples.values(), *scratch_samples.values())), default=0)
    if count == 0 or not up_samples or not scratch_samples:
        return np.empty(0)
    log_grid = np.linspace(math.log(d2_range[0]), math.log(d2_range[1]), grid_points)
    d2 = np.exp(log_grid)[None, :]
    up_law, scratch_law = get_law(upcycled_fit.law), get_law(scratch_fit.law)
    sizes = {"n1": n1} if "n1" in up_law.variables else {}
    scratch_sizes = {"n": n2} if "n" in scratch_law.variables else {}
    with np.errstate(over="ignore", invalid="ignore"):
        diff = up_law.predict(_sample_params(upcycled_fit, count), d1=d1, d2=d2, **sizes) - scratch_law.predict(
            _sample_params(scratch_fit, count), d=scratch_tokens(d1, d2, n1, n2, count_sunk_cost), **scratch_sizes
        )
    better = diff < 0
    out = np.where(better[:, -1], math.inf, 0.0)
    crossing = ~better[:, -1] & better.any(axis=1)
    last = better.shape[1] - 1 - np.argmax(better[:, ::-1], axis=1)  # last index upcycle better
    rows = np.flatnonzero(crossing)
    if rows.size:
        i = last[rows]
        before, after = diff[rows, i], diff[rows, i + 1]
        fraction = np.where(after != before, -before / (after - before), 0.5)
        out[rows] = np.exp(log_grid[i] + fraction * (log_grid[i + 1] - log_grid[i]))
    return out


def closed_form_break_even_d2(
    upcycled_fit: FittedLaw,
    scratch_fit: FittedLaw,
    d1: float,
    *,
    n1: float | None = None,
    n2: float | None = None,
    count_sunk_cost: bool = False,
    rtol: float = 1e-9,
) -> float | None:
    """D2* in closed form (see the module docstring), or None where none exists.

    Same conventions as :func:`break_even_d2` (inf / 0.0), without a range.
    """
    if count_sunk_cost:
        return None
    c_u, a_u, gamma = _power_form_upcycled(upcycled_fit, d1, n1)
    c_s, b_s, beta = _power_form_scratch(scratch_fit, n2)
    same_constant = math.isclose(c_u, c_s, rel_tol=rtol, abs_tol=0.0)
    same_exponent = math.isclose(gamma, beta, rel_tol=rtol, abs_tol=0.0)
    if same_constant and same_exponent:
        # g = (a_u - b_s) D2^-beta: one sign everywhere
        return 0.0 if a_u >= b_s else math.inf
    if same_constant:
        # g = D2^-beta * (a_u * D2^(beta - gamma) - b_s)
        if beta > gamma:
            return float((b_s / a_u) ** (1.0 / (beta - gamma)))
        return math.inf  # upcycling ends up better (or crosses the other way)
    if same_exponent:
        # g = (c_u - c_s) + (a_u - b_s) D2^-beta
        delta_c, delta_a = c_u - c_s, a_u - b_s
        if delta_c < 0:
            return math.inf
        if delta_a >= 0:
            return 0.0
        return float((-delta_a / delta_c) ** (1.0 / beta))
    return None


def guidance_table(
    upcycled_fit: FittedLaw,
    scratch_fit: FittedLaw,
    d1_values,
    *,
    n1: float,
    n2: float,
    d2_range: tuple[float, float] = DEFAULT_D2_RANGE,
) -> list[dict[str, Any]]:
    """For each D1 and both compute accountings: D2*, its status, the closed form where one
    exists, and the effective D2 exponent alpha2 - alpha3 ln D1 of the upcycled law."""
    upcycled = upcycled_loss_fn(upcycled_fit, n1)
    scratch = scratch_loss_fn(scratch_fit, n2)
    rows = []
    for d1 in np.asarray(d1_values, dtype=float):
        for count_sunk_cost in (False, True):
            numeric = break_even_d2(
                upcycled, scratch, d1, n1=n1, n2=n2, count_sunk_cost=count_sunk_cost, d2_range=d2_range
            )
            closed = closed_form_break_even_d2(
                upcycled_fit, scratch_fit, d1, n1=n1, n2=n2, count_sunk_cost=count_sunk_cost
            )
            rows.append(
                {
                    "d1": float(d1),
                    "count_sunk_cost": count_sunk_cost,
                    "d2_star": numeric.d2_star,
                    "status": numeric.status,
                    "closed_form_d2_star": closed,
                    "effective_d2_exponent": float(_power_form_upcycled(upcycled_fit, d1, n1)[2]),
                    "d2_range": list(numeric.d2_range),
                    "n1": float(n1),
                    "n2": float(n2),
                }
            )
    return rows


def equal_compute_curves(
    upcycled_fit: FittedLaw,
    scratch_fit: FittedLaw,
    d1: float,
    d2_values,
    *,
    n1: float,
    n2: float,
    count_sunk_cost: bool,
) -> dict[str, np.ndarray]:
    """Upcycled and from-scratch losses at equal compute along D2 (for the figure)."""
    d2 = np.asarray(d2_values, dtype=float)
    d_s = scratch_tokens(d1, d2, n1, n2, count_sunk_cost)
    compute = 6.0 * n2 * d2 + (6.0 * n1 * d1 if count_sunk_cost else 0.0)
    return {
        "d2": d2,
        "scratch_tokens": d_s,
        "compute": compute,
        "upcycled_loss": upcycled_loss_fn(upcycled_fit, n1)(d1, d2),
        "scratch_loss": scratch_loss_fn(scratch_fit, n2)(d_s),
    }
