"""Which fit is which: :class:`FitKey`, the name of one fitted law, and :class:`FitSet`, the
fits of one report with the questions the report asks of them.

A key names the law and the runs it was fitted to. Its string is the fit's file name under
``results/fits/`` (without ``.json``) and its name in ``findings.json`` and ``guidance.json``:

- ``<law>.<method>.<size>.<moe>`` for the laws of one dense size (``PER_SIZE_LAWS``);
- ``<law>.<method>.<moe>`` for the laws across sizes (``ACROSS_SIZES_LAWS``);
- ``model_config.<method>``, and ``chinchilla_dense`` (the dense runs of every method);
- ``<law>`` alone for a law skipped before its runs were grouped (no upcycled or no
  from-scratch runs at all).

``<moe>`` is a :class:`MoeVariant`, ``e<E>k<k>g<G>`` (``e1k1g1``: a dense architecture), with
``r<r>`` appended for Drop-Upcycling's re-initialisation ratio r > 0 (``e4k2g1r0.5``; r = 0
writes nothing, so every key written before r existed keeps its string). The parameter-count
convention is not in a key: one fit stage uses one, recorded in each fit's context
(``parameter_counts``).

The from-scratch fit an upcycled one is compared with (``FitSet.scratch_for``): the
from-scratch runs of the same method and MoE variant, whatever r (a from-scratch MoE has no
r); for a dataset law first its size's ``scratch_power``, then ``chinchilla_scratch``; for the
joint law the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import total_ordering

from upcycling.analysis.fitresult import FitResult
from upcycling.core.errors import InputError

__all__ = [
    "ACROSS_SIZES_LAWS",
    "DATASET_FAMILY",
    "JOINT_FAMILY",
    "PER_SIZE_LAWS",
    "COMPARED_LAWS",
    "FitKey",
    "FitPair",
    "FitSet",
    "MoeVariant",
]

DATASET_FAMILY = ("dataset", "dataset_no_interaction", "dataset_additive")
JOINT_FAMILY = ("joint", "joint_no_interaction")
PER_SIZE_LAWS = (*DATASET_FAMILY, "scratch_power")
ACROSS_SIZES_LAWS = (*JOINT_FAMILY, "chinchilla_scratch")
COMPARED_LAWS = ("dataset", "joint")  # the upcycled-MoE laws the report compares with training from scratch

# law -> the segments its key carries after the law's name, in order
_SEGMENTS: dict[str, tuple[str, ...]] = {
    **{law: ("method", "size", "moe") for law in PER_SIZE_LAWS},
    **{law: ("method", "moe") for law in ACROSS_SIZES_LAWS},
    "model_config": ("method",),
    "chinchilla_dense": (),
}
_MOE_PATTERN = re.compile(r"e(\d+)k(\d+)g(\d+)(?:r(\d+(?:\.\d+)?(?:e-\d+)?))?")


def _shape(law: str) -> str:
    """The key shapes of ``law``, in words: what a malformed key is told to be."""
    segments = _SEGMENTS[law]
    if not segments:
        return f"a {law} key is {law} alone"
    return f"a {law} key is {'.'.join((law, *(f'<{name}>' for name in segments)))} (or {law} alone)"


@dataclass(frozen=True, order=True)
class MoeVariant:
    """The second-stage architecture of a fit: E experts, top-k routing, granularity G, and the
    share r of each expert's intermediate units re-initialised when upcycled (Drop-Upcycling)."""

    experts: int
    top_k: int
    granularity: int
    reinit_ratio: float = 0.0

    def __str__(self) -> str:
        suffix = f"r{self.reinit_ratio:g}" if self.reinit_ratio else ""
        return f"e{self.experts}k{self.top_k}g{self.granularity}{suffix}"

    @property
    def architecture(self) -> MoeVariant:
        """The variant without r: that of the from-scratch runs, which have no re-initialisation."""
        return replace(self, reinit_ratio=0.0)

    @classmethod
    def parse(cls, text: str) -> MoeVariant:
        match = _MOE_PATTERN.fullmatch(text)
        if match is None:
            raise InputError(
                f"MoE variant {text!r}: expected e<experts>k<top_k>g<granularity>, optionally followed by "
                "r<reinit_ratio> for a ratio above 0, e.g. 'e4k2g1' or 'e4k2g1r0.5'"
            )
        experts, top_k, granularity, ratio = match.groups()
        variant = cls(int(experts), int(top_k), int(granularity), 0.0 if ratio is None else float(ratio))
        if str(variant) != text:  # one name per fit: 'r0', 'r0.50' and the like are other spellings
            raise InputError(f"MoE variant {text!r}: write it {str(variant)!r}")
        return variant


@total_ordering
@dataclass(frozen=True)
class FitKey:
    """The name of one fit: its law and, as the law's key shape says, method, size and MoE variant.

    Keys sort as their strings do, so a fit set lists its fits in the order of their files."""

    law: str
    method: str | None = None
    size: str | None = None
    moe: MoeVariant | None = None

    def __post_init__(self) -> None:
        if self.law not in _SEGMENTS:
            raise InputError(f"fit key of law {self.law!r}: no such law; the laws are {', '.join(_SEGMENTS)}")
        present = tuple(name for name in ("method", "size", "moe") if getattr(self, name) is not None)
        if present and present != _SEGMENTS[self.law]:
            raise InputError(f"fit key {self}: {_shape(self.law)}")

    def __str__(self) -> str:
        return ".".join(str(part) for part in (self.law, self.method, self.size, self.moe) if part is not None)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, FitKey):
            return NotImplemented
        return str(self) < str(other)

    @classmethod
    def parse(cls, text: str) -> FitKey:
        law, *rest = text.split(".")
        if law not in _SEGMENTS:
            raise InputError(f"fit key {text!r}: unknown law {law!r}; the laws are {', '.join(_SEGMENTS)}")
        names = _SEGMENTS[law]
        tail = ".".join(rest[len(names) - 1 :])
        if names[-1:] == ("moe",) and len(rest) > len(names) and _MOE_PATTERN.fullmatch(tail):
            rest = [*rest[: len(names) - 1], tail]  # the ratio's decimal point: 'e4k2g1r0.5'
        if rest and len(rest) != len(names):
            raise InputError(f"fit key {text!r}: {_shape(law)}")
        segments = dict(zip(names, rest))
        moe = segments.pop("moe", None)
        try:
            return cls(law, **segments, moe=None if moe is None else MoeVariant.parse(moe))
        except InputError as error:
            raise InputError(f"fit key {text!r}: {error}") from None

    def with_law(self, law: str) -> FitKey:
        """The key of ``law`` fitted to the same runs (a baseline, a from-scratch law of the same shape)."""
        return replace(self, law=law)

    def scratch_key(self, law: str) -> FitKey:
        """The key of the from-scratch law ``law`` of the same shape (a dataset law's
        ``scratch_power``) of this fit's method, size and architecture (from-scratch runs have
        no re-initialisation ratio)."""
        return replace(self, law=law, moe=None if self.moe is None else self.moe.architecture)


@dataclass(frozen=True)
class FitPair:
    """An upcycled fit at one dense size and the from-scratch fit it is compared with."""

    upcycled_key: FitKey
    upcycled: FitResult
    size: str
    scratch_key: FitKey
    scratch: FitResult


class FitSet(Mapping[FitKey, FitResult]):
    """The fits of one report by key, in key order; built once, read by the guidance, the
    findings, the figures and the tables alike."""

    def __init__(self, fits: Mapping[FitKey, FitResult]) -> None:
        for key, fit in fits.items():
            if fit.law != key.law or fit.key != str(key):
                raise InputError(
                    f"the fit named {key} holds the fit {fit.key!r} of law {fit.law!r}: "
                    "fits/<key>.json must keep the name the fit stage gave it (run `upcycling fit` again)"
                )
        self._fits = {key: fits[key] for key in sorted(fits)}

    @classmethod
    def of(cls, fits: Mapping[str, FitResult]) -> FitSet:
        """The fit set of fits by key string (as ``fit_all`` and ``load_fits`` give them)."""
        return cls({FitKey.parse(key): fit for key, fit in fits.items()})

    def __getitem__(self, key: FitKey) -> FitResult:
        return self._fits[key]

    def __iter__(self) -> Iterator[FitKey]:
        return iter(self._fits)

    def __len__(self) -> int:
        return len(self._fits)

    def fitted(self, key: FitKey) -> FitResult | None:
        """The fit of ``key`` if there is one and it has parameters."""
        fit = self._fits.get(key)
        return fit if fit is not None and fit.ok else None

    def select(
        self,
        laws: Iterable[str] | None = None,
        *,
        method: str | None = None,
        size: str | None = None,
        moe: MoeVariant | None = None,
        fitted: bool = False,
    ) -> list[tuple[FitKey, FitResult]]:
        """The fits of these laws (all when None), method, size and MoE variant, in key order;
        ``fitted``: only those with parameters."""
        chosen = None if laws is None else set(laws)
        return [
            (key, fit)
            for key, fit in self._fits.items()
            if (chosen is None or key.law in chosen)
            and all(
                want is None or want == have for want, have in ((method, key.method), (size, key.size), (moe, key.moe))
            )
            and (fit.ok or not fitted)
        ]

    def scratch_for(self, key: FitKey, size: str | None = None) -> tuple[FitKey, FitResult] | None:
        """The fitted from-scratch law to compare the upcycled fit ``key`` with at ``size``
        (default: the key's own size), or None (see the module docstring)."""
        size = key.size if size is None else size
        moe = None if key.moe is None else key.moe.architecture
        across = FitKey("chinchilla_scratch", key.method, moe=moe)
        per_size = [FitKey("scratch_power", key.method, size, moe)] if size is not None else []
        order = [*per_size, across] if key.law in DATASET_FAMILY else [across, *per_size]
        for candidate in order:
            fit = self.fitted(candidate)
            if fit is not None:
                return candidate, fit
        return None

    def upcycled_pairs(self) -> list[FitPair]:
        """Every fitted dataset law, and every fitted joint law at each of its sizes, with the
        from-scratch fit it is compared with; those without one are left out."""
        pairs = []
        for key, fit in self.select(COMPARED_LAWS, fitted=True):
            sizes = fit.context.get("sizes", {})
            for size in [key.size] if key.law == "dataset" else sorted(sizes):
                scratch = self.scratch_for(key, size) if size in sizes else None
                if size is not None and scratch is not None:
                    pairs.append(FitPair(key, fit, size, *scratch))
        return pairs
