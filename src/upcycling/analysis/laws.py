"""Scaling laws of upcycled MoE language models (Liew, Kato, Takase 2025) and their baselines.

Every law is a pure numpy function of named variables, in natural units:

- ``dataset(d1, d2, A, alpha1, alpha2, alpha3, E)``:
  A * D1^-alpha1 * D2^(-alpha2 + alpha3 ln D1) + E
- ``dataset_no_interaction(d1, d2, A, alpha1, alpha2, E)``: the same with alpha3 = 0
- ``dataset_additive(d1, d2, A, alpha1, B, alpha2, E)``: A * D1^-alpha1 + B * D2^-alpha2 + E
- ``model_config(p, n2, A, beta1, F, beta2, E)``: A * P^-beta1 + F * N2^-beta2 + E
  (P = total / active parameters, N2 = active parameters)
- ``joint(d1, d2, n1, A, alpha1, alpha2, alpha3, B, beta2, E)``: dataset law + B * N1^-beta2
- ``joint_no_interaction(d1, d2, n1, A, alpha1, alpha2, B, beta2, E)``
- ``chinchilla(n, d, E, A, alpha, B, beta)``: E + A / N^alpha + B / D^beta
- ``data_power(d, B, beta, E)``: E + B / D^beta (one model size, only the data varies)

``LAWS`` is the registry: name -> :class:`Law` (variables, the tidy-table field of each, parameters
with bounds and initial-value grids, baselines, the variables a held-out check removes the largest
value of): the laws above, with ``chinchilla_dense`` (N = dense params, D = D1),
``chinchilla_scratch`` (N = active params, D = tokens) and ``scratch_power`` (one scratch size).
``get_law(name) -> Law``; ``Law.predict(params, **variables)`` works in natural units.

Every law is a sum of positive terms, each a power law (an amplitude times powers of the
variables), so log L = logsumexp over terms t_j, and every t_j is *linear* in the fit-space
parameters (log-amplitudes and exponents). ``Law.design`` returns that linear map; fitting
(:mod:`upcycling.analysis.fitting`) uses it for exact log-space predictions, gradients and Jacobians.

Fits run on variables divided by a reference scale (the geometric mean of the data), which
decorrelates amplitudes from exponents; ``Law.unscale`` maps the fitted parameters back to
natural units (every law keeps its form under a rescaling of its variables).

Bounds. Only what the physics needs: amplitudes and E are positive (they are fitted as logs),
and nothing constrains the sign of an exponent or of the interaction alpha3. The fit-space
bounds are numerical limits far outside any plausible law (a log-amplitude's lower bound means
"this term is zero"); a fit that ends on one says so (:mod:`upcycling.analysis.diagnostics`). The prior
"more data never hurts" is an explicit option (``Law.bounds(monotone=True)``): it keeps the
local slope of every data variable at the centre of the data >= 0 (the exponents marked
``monotone``); for the interaction laws the natural alpha1 and alpha2 equal those slopes plus
alpha3 times the log of the other variable's reference, so it also bounds alpha3.

Parameter counts (N1, N2, P): the tidy-table columns ``n1_params``, ``n2_params`` and
``sparsity`` that :mod:`upcycling.analysis.fitstage` derives from the store under one counting convention
(non-embedding parameters by default; see docs/fits.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LAWS",
    "Law",
    "ParamSpec",
    "chinchilla",
    "data_power",
    "dataset",
    "dataset_additive",
    "dataset_no_interaction",
    "get_law",
    "joint",
    "joint_no_interaction",
    "model_config",
]


# --------------------------------------------------------------------------------------------
# The laws, in natural units
# --------------------------------------------------------------------------------------------


def dataset(d1, d2, A, alpha1, alpha2, alpha3, E):
    """Upcycled MoE loss vs dense tokens D1 and MoE tokens D2, with the D1-D2 interaction."""
    d1 = np.asarray(d1, dtype=float)
    d2 = np.asarray(d2, dtype=float)
    return A * d1 ** (-alpha1) * d2 ** (-alpha2 + alpha3 * np.log(d1)) + E


def dataset_no_interaction(d1, d2, A, alpha1, alpha2, E):
    """Baseline: the dataset law with alpha3 = 0 (a plain product of power laws)."""
    return dataset(d1, d2, A, alpha1, alpha2, 0.0, E)


def dataset_additive(d1, d2, A, alpha1, B, alpha2, E):
    """Baseline: independent power laws in D1 and D2."""
    d1 = np.asarray(d1, dtype=float)
    d2 = np.asarray(d2, dtype=float)
    return A * d1 ** (-alpha1) + B * d2 ** (-alpha2) + E


def model_config(p, n2, A, beta1, F, beta2, E):
    """Upcycled MoE loss vs sparsity P (total / active parameters) and active parameters N2."""
    p = np.asarray(p, dtype=float)
    n2 = np.asarray(n2, dtype=float)
    return A * p ** (-beta1) + F * n2 ** (-beta2) + E


def joint(d1, d2, n1, A, alpha1, alpha2, alpha3, B, beta2, E):
    """Upcycled MoE loss vs D1, D2 and the dense model size N1."""
    n1 = np.asarray(n1, dtype=float)
    return dataset(d1, d2, A, alpha1, alpha2, alpha3, 0.0) + B * n1 ** (-beta2) + E


def joint_no_interaction(d1, d2, n1, A, alpha1, alpha2, B, beta2, E):
    """Baseline: the joint law with alpha3 = 0."""
    return joint(d1, d2, n1, A, alpha1, alpha2, 0.0, B, beta2, E)


def chinchilla(n, d, E, A, alpha, B, beta):
    """Hoffmann et al. (2022): L = E + A / N^alpha + B / D^beta (N = active params for an MoE)."""
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    return E + A * n ** (-alpha) + B * d ** (-beta)


def data_power(d, B, beta, E):
    """L = E + B / D^beta: Chinchilla at one fixed model size (its A/N^alpha folded into E)."""
    d = np.asarray(d, dtype=float)
    return E + B * d ** (-beta)


# --------------------------------------------------------------------------------------------
# Log-space terms: each law's log L = logsumexp_j t_j, with t_j linear in the fit parameters.
# A term is a mapping fit-parameter name -> coefficient (1 or an array of log-variables).
# --------------------------------------------------------------------------------------------

Terms = list[dict[str, "float | np.ndarray"]]


def _dataset_terms(x, interaction=True):
    term = {"log_A": 1.0, "alpha1": -x["d1"], "alpha2": -x["d2"]}
    if interaction:
        term["alpha3"] = x["d1"] * x["d2"]
    return [term, {"log_E": 1.0}]


def _additive_terms(x):
    return [{"log_A": 1.0, "alpha1": -x["d1"]}, {"log_B": 1.0, "alpha2": -x["d2"]}, {"log_E": 1.0}]


def _model_config_terms(x):
    return [{"log_A": 1.0, "beta1": -x["p"]}, {"log_F": 1.0, "beta2": -x["n2"]}, {"log_E": 1.0}]


def _joint_terms(x, interaction=True):
    data_term, e_term = _dataset_terms(x, interaction)
    return [data_term, {"log_B": 1.0, "beta2": -x["n1"]}, e_term]


def _chinchilla_terms(x):
    return [{"log_A": 1.0, "alpha": -x["n"]}, {"log_B": 1.0, "beta": -x["d"]}, {"log_E": 1.0}]


def _data_power_terms(x):
    return [{"log_B": 1.0, "beta": -x["d"]}, {"log_E": 1.0}]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One fit-space parameter.

    ``name`` is the fit-space name (``log_A`` for an amplitude A, else the exponent's name);
    ``natural`` the name in the law's function. Bounds and the initial-value grid are in fit
    space, for variables scaled to their reference (geometric mean of the data): an amplitude's
    log is then the term's log-size at the centre of the data, an exponent the local slope there.
    ``monotone``: an exponent that the "more data never hurts" prior keeps >= 0.
    """

    name: str
    bounds: tuple[float, float]
    grid: tuple[float, ...]
    monotone: bool = False

    @property
    def is_log_amplitude(self) -> bool:
        return self.name.startswith("log_")

    @property
    def natural(self) -> str:
        return self.name[4:] if self.is_log_amplitude else self.name

    def prior_bounds(self, monotone: bool) -> tuple[float, float]:
        """The bounds, with the "more data never hurts" prior applied when ``monotone``."""
        if monotone and self.monotone:
            return (max(self.bounds[0], 0.0), self.bounds[1])
        return self.bounds


# Shared bounds/grids. Amplitude grids are log term sizes at the data centre: losses of a few
# nats split between reducible and irreducible parts put them within roughly [-4, 2]. The
# bounds are numerical limits, not assumptions: a term below e^-30 nats is absent, exponents
# beyond +-10 or |alpha3| > 1 would change the loss by e^10 over a factor e of tokens.
_AMP = dict(bounds=(-30.0, 8.0), grid=(-3.0, -1.5, 0.0, 1.0))
_EXPONENT = dict(bounds=(-10.0, 10.0), grid=(-0.2, 0.1, 0.3, 0.7, 1.5), monotone=True)
_INTERACTION = dict(bounds=(-1.0, 1.0), grid=(-0.02, 0.0, 0.02, 0.08))
_LOG_E = dict(bounds=(-30.0, 6.0), grid=(-1.0, 0.0, 0.7, 1.3))


def _p(name: str, kind: dict) -> ParamSpec:
    return ParamSpec(name, **kind)


@dataclass(frozen=True)
class Law:
    """A scaling law: its function, variables and fit parameters."""

    name: str
    formula: str
    function: Callable[..., np.ndarray]
    variables: tuple[str, ...]
    fields: Mapping[str, str]  # variable -> column of the tidy runs table (upcycling.analysis.store)
    params: tuple[ParamSpec, ...]
    terms: Callable[[Mapping[str, np.ndarray]], Terms] = field(repr=False)
    baselines: tuple[str, ...] = ()
    holdout: tuple[str, ...] = ()  # variables whose largest value a held-out refit removes
    min_distinct: Mapping[str, int] = field(default_factory=dict)  # distinct values needed
    description: str = ""

    @property
    def param_names(self) -> list[str]:
        """Fit-space names (``log_A``, exponents ...), in design-column order."""
        return [p.name for p in self.params]

    @property
    def natural_names(self) -> list[str]:
        return [p.natural for p in self.params]

    @property
    def n_params(self) -> int:
        return len(self.params)

    def bounds(self, monotone: bool = False) -> np.ndarray:
        """Fit-space bounds, shape (params, 2); ``monotone``: the "more data never hurts" prior."""
        return np.array([spec.prior_bounds(monotone) for spec in self.params], dtype=float)

    def amplitude_terms(self) -> dict[str, int]:
        """Log-amplitude parameter -> index of the one term it scales."""
        probe = self.design({v: np.zeros(1) for v in self.variables})[0]
        return {
            spec.name: int(np.flatnonzero(probe[:, i])[0])
            for i, spec in enumerate(self.params)
            if spec.is_log_amplitude
        }

    # ---- evaluation ------------------------------------------------------------------------

    def predict(self, params: Mapping[str, float | np.ndarray], **variables) -> np.ndarray:
        """Loss from natural-units parameters (``A``, ``alpha1`` ...) and variables; parameter
        arrays (one value per bootstrap sample) broadcast against the variables."""
        kwargs = {name: params[name] for name in self.natural_names}
        return np.asarray(self.function(**{v: variables[v] for v in self.variables}, **kwargs))

    def design(self, log_vars: Mapping[str, np.ndarray]) -> np.ndarray:
        """Design tensor F of shape (points, terms, params): term t_j = F[:, j, :] @ theta."""
        arrays = np.broadcast_arrays(*(np.atleast_1d(np.asarray(log_vars[v], dtype=float)) for v in self.variables))
        x = dict(zip(self.variables, (a.reshape(-1) for a in arrays)))
        n_points = arrays[0].size
        terms = self.terms(x)
        index = {name: i for i, name in enumerate(self.param_names)}
        out = np.zeros((n_points, len(terms), self.n_params))
        for j, term in enumerate(terms):
            for name, coefficient in term.items():
                out[:, j, index[name]] = coefficient
        return out

    def log_predict(self, theta: np.ndarray, log_vars: Mapping[str, np.ndarray]) -> np.ndarray:
        """log L from fit-space parameters (vector in ``param_names`` order), stably (LSE)."""
        t = self.design(log_vars) @ np.asarray(theta, dtype=float)
        peak = t.max(axis=1)
        return peak + np.log(np.exp(t - peak[:, None]).sum(axis=1))

    # ---- parameter spaces ------------------------------------------------------------------

    def to_natural(self, theta: np.ndarray) -> dict[str, float]:
        """Fit-space vector (for unscaled variables) -> natural parameters (amplitudes exp'd)."""
        return {
            p.natural: float(np.exp(v) if p.is_log_amplitude else v)
            for p, v in zip(self.params, np.asarray(theta, dtype=float))
        }

    def from_natural(self, params: Mapping[str, float]) -> np.ndarray:
        """Natural parameters -> fit-space vector (for unscaled variables)."""
        return np.array(
            [np.log(params[p.natural]) if p.is_log_amplitude else params[p.natural] for p in self.params], dtype=float
        )

    def unscale_matrix(self, log_ref: Mapping[str, float]) -> np.ndarray:
        """Matrix M with theta_natural_units = M @ theta_scaled.

        theta_scaled are the fit-space parameters of the law written in v / ref instead of v.
        Each term is linear in both parameter sets and must agree for every v, so M solves
        design(log v) @ M = design(log v - log ref) on a handful of generic points (the
        system is exactly consistent; the points only need to be in general position).
        """
        rng = np.random.default_rng(0)
        n_probe = 3 * self.n_params + 3
        probe = {v: float(log_ref[v]) + rng.normal(size=n_probe) for v in self.variables}
        natural = self.design(probe).reshape(-1, self.n_params)
        scaled = self.design({v: probe[v] - float(log_ref[v]) for v in self.variables})
        matrix, *_ = np.linalg.lstsq(natural, scaled.reshape(-1, self.n_params), rcond=None)
        return matrix

    def unscale(self, theta_scaled: np.ndarray, log_ref: Mapping[str, float]) -> np.ndarray:
        return self.unscale_matrix(log_ref) @ np.asarray(theta_scaled, dtype=float)

    def scale(self, theta: np.ndarray, log_ref: Mapping[str, float]) -> np.ndarray:
        return np.linalg.solve(self.unscale_matrix(log_ref), np.asarray(theta, dtype=float))


_TOKENS = {"d1": "d1_tokens", "d2": "d2_tokens"}
_TOKENS_N1 = {**_TOKENS, "n1": "n1_params"}
_A, _B, _F, _E = _p("log_A", _AMP), _p("log_B", _AMP), _p("log_F", _AMP), _p("log_E", _LOG_E)
_A1, _A2, _A3 = _p("alpha1", _EXPONENT), _p("alpha2", _EXPONENT), _p("alpha3", _INTERACTION)
_ALPHA, _BETA = _p("alpha", _EXPONENT), _p("beta", _EXPONENT)
_B1, _B2 = _p("beta1", _EXPONENT), _p("beta2", _EXPONENT)
_DATASET_FORMULA = "L = A * D1^-alpha1 * D2^(-alpha2 + alpha3 * ln D1) + E"
_CHINCHILLA_FORMULA = "L = E + A / N^alpha + B / D^beta"

LAWS: dict[str, Law] = {
    law.name: law
    for law in [
        Law(
            "dataset",
            _DATASET_FORMULA,
            dataset,
            ("d1", "d2"),
            _TOKENS,
            (_A, _A1, _A2, _A3, _E),
            _dataset_terms,
            baselines=("dataset_no_interaction", "dataset_additive"),
            holdout=("d2", "d1"),
            min_distinct={"d1": 2, "d2": 2},
            description="upcycled runs of one method, dense size and expert configuration",
        ),
        Law(
            "dataset_no_interaction",
            "L = A * D1^-alpha1 * D2^-alpha2 + E",
            dataset_no_interaction,
            ("d1", "d2"),
            _TOKENS,
            (_A, _A1, _A2, _E),
            lambda x: _dataset_terms(x, False),
            holdout=("d2", "d1"),
            min_distinct={"d1": 2, "d2": 2},
            description="baseline of the dataset law without the D1-D2 interaction",
        ),
        Law(
            "dataset_additive",
            "L = A * D1^-alpha1 + B * D2^-alpha2 + E",
            dataset_additive,
            ("d1", "d2"),
            _TOKENS,
            (_A, _A1, _B, _A2, _E),
            _additive_terms,
            holdout=("d2", "d1"),
            min_distinct={"d1": 2, "d2": 2},
            description="baseline of the dataset law with independent D1 and D2 terms",
        ),
        Law(
            "model_config",
            "L = A * P^-beta1 + F * N2^-beta2 + E",
            model_config,
            ("p", "n2"),
            {"p": "sparsity", "n2": "n2_params"},
            (_A, _B1, _F, _B2, _E),
            _model_config_terms,
            holdout=("n2", "p"),
            min_distinct={"p": 2, "n2": 2},
            description="upcycled runs at one (D1, D2) over sparsities P and active sizes N2",
        ),
        Law(
            "joint",
            _DATASET_FORMULA[:-4] + " + B * N1^-beta2 + E",
            joint,
            ("d1", "d2", "n1"),
            _TOKENS_N1,
            (_A, _A1, _A2, _A3, _B, _B2, _E),
            _joint_terms,
            baselines=("joint_no_interaction",),
            holdout=("d2", "d1", "n1"),
            min_distinct={"d1": 2, "d2": 2, "n1": 3},
            description="upcycled runs of one method and expert configuration over dense sizes",
        ),
        Law(
            "joint_no_interaction",
            "L = A * D1^-alpha1 * D2^-alpha2 + B * N1^-beta2 + E",
            joint_no_interaction,
            ("d1", "d2", "n1"),
            _TOKENS_N1,
            (_A, _A1, _A2, _B, _B2, _E),
            lambda x: _joint_terms(x, False),
            holdout=("d2", "d1", "n1"),
            min_distinct={"d1": 2, "d2": 2, "n1": 3},
            description="baseline of the joint law without the D1-D2 interaction",
        ),
        Law(
            "chinchilla_dense",
            _CHINCHILLA_FORMULA,
            chinchilla,
            ("n", "d"),
            {"n": "n1_params", "d": "d1_tokens"},
            (_E, _A, _ALPHA, _B, _BETA),
            _chinchilla_terms,
            holdout=("d", "n"),
            min_distinct={"n": 3, "d": 2},
            description="dense runs (N = N1, D = dense tokens)",
        ),
        Law(
            "chinchilla_scratch",
            _CHINCHILLA_FORMULA,
            chinchilla,
            ("n", "d"),
            {"n": "n2_params", "d": "d2_tokens"},
            (_E, _A, _ALPHA, _B, _BETA),
            _chinchilla_terms,
            holdout=("d", "n"),
            min_distinct={"n": 3, "d": 2},
            description="second-stage architecture trained from scratch (N = N2, D = tokens)",
        ),
        Law(
            "scratch_power",
            "L = E + B / D^beta",
            data_power,
            ("d",),
            {"d": "d2_tokens"},
            (_B, _BETA, _E),
            _data_power_terms,
            holdout=("d",),
            min_distinct={"d": 3},
            description="from-scratch runs of one size (Chinchilla with N fixed)",
        ),
    ]
}


def get_law(law: str | Law) -> Law:
    """The registered law of that name (or the law itself)."""
    if isinstance(law, Law):
        return law
    try:
        return LAWS[law]
    except KeyError:
        raise KeyError(f"unknown law {law!r}; known: {', '.join(LAWS)}") from None
