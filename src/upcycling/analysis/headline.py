"""The report's answer, first: upcycle or train from scratch, per dense size and D1 (pure).

``answer_tables(fits: FitSet, guidance) -> list[AnswerTable]``: one table per dense model size,
one row per D1, one column per (method and MoE variant, compute accounting). A cell is D2* with
its 95% bootstrap interval, "upcycle throughout" / "from scratch throughout" where every
bootstrap sample agrees over the searched range, or "inconclusive: add <runs>".

Which law answers (``preferred_pairs``): per method, variant and size, the guidance pair whose
upcycled and from-scratch fits are healthiest (fewest fits not converged, then fewest parameters
not identified), the joint law before the per-size dataset law on a tie (it pools every size's
runs); the other law's D2* goes below "Details".

Runs to add (``runs_to_add``): the extension search of the fits involved
(:mod:`upcycling.analysis.diagnostics`, the cheapest extension that identifies a parameter they
leave open), else runs that bracket the estimate: upcycled runs at D2 near D2* and from-scratch
runs at the same compute.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from upcycling.analysis import guidance as guide
from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import FitKey, FitSet

__all__ = ["AnswerTable", "answer_lines", "answer_tables", "preferred_pairs", "runs_to_add", "tokens_text"]

_SUFFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def tokens_text(tokens: float | None) -> str:
    """A token count for a reader: 3 significant digits with K, M, B or T (∞, 0, n/a as such)."""
    if tokens is None or (isinstance(tokens, float) and math.isnan(tokens)):
        return "n/a"
    value = float(tokens)
    if math.isinf(value):
        return "∞"
    if value == 0:
        return "0"
    for scale, suffix in _SUFFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class AnswerTable:
    """One dense size's answer: ``header`` and ``rows`` of text cells; ``laws``: the upcycled and
    from-scratch fit of each column group, as "upcycled vs scratch"."""

    size: str
    n1: float
    n2: float
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    laws: tuple[str, ...]
    data: tuple[dict, ...]  # per cell: d1, column, the guidance row's numbers, the text

    @property
    def title(self) -> str:
        return (
            f"Size {self.size} (N1 = {tokens_text(self.n1)}, N2 = {tokens_text(self.n2)} active parameters): "
            + "; ".join(self.laws)
        )


def _health(fit: FitResult | None) -> tuple[int, int]:
    if fit is None:
        return (2, 0)
    return (0 if fit.converged else 1, len(fit.not_identified()))


def preferred_pairs(fits: FitSet, guidance: list[dict]) -> dict[tuple, tuple[str, str]]:
    """(method, moe, size) -> (upcycled fit, scratch fit) of the law that answers (see the module docstring)."""
    candidates: dict[tuple, set[tuple[str, str]]] = {}
    for row in guidance:
        candidates.setdefault((row["method"], row["moe"], row["size"]), set()).add(
            (row["upcycled_fit"], row["scratch_fit"])
        )

    def score(pair: tuple[str, str]):
        up, scratch = (fits.fitted(FitKey.parse(key)) for key in pair)
        (up_bad, up_open), (scratch_bad, scratch_open) = _health(up), _health(scratch)
        return (up_bad + scratch_bad, up_open + scratch_open, not pair[0].startswith("joint"), pair)

    return {group: min(pairs, key=score) for group, pairs in candidates.items()}


def _extension_runs(fit: FitResult | None, label: str) -> str | None:
    """The cheapest extension the fit's identification names, with the runs' kind."""
    if fit is None:
        return None
    found = [
        entry for entry in fit.identification.values() if not entry.get("identified", True) and entry.get("extension")
    ]
    if not found:
        return None
    cheapest = min(found, key=lambda entry: (entry.get("runs", math.inf), entry.get("tokens", math.inf)))
    return f"{label} {cheapest['extension']}"  # the extension text starts with "add"


def runs_to_add(row: dict, upcycled: FitResult | None, scratch: FitResult | None) -> str:
    """The runs that would settle an inconclusive cell (see the module docstring)."""
    named = [
        text
        for text in (_extension_runs(upcycled, "upcycled:"), _extension_runs(scratch, "from scratch:"))
        if text is not None
    ]
    if named:
        return "; ".join(named)
    d2_star, (low_end, high_end) = row["d2_star"], row["d2_range"]
    data_low, data_high = row.get("data_d2_range") or (low_end, high_end)
    target = d2_star if 0 < d2_star < math.inf else data_high * 4 if math.isinf(d2_star) else data_low / 2
    scratch_d = float(guide.scratch_tokens(row["d1"], target, row["n1"], row["n2"], row["count_sunk_cost"]))
    return f"add runs at D2 ≈ {tokens_text(target)} (upcycled, D1 = {tokens_text(row['d1'])}) and D ≈ {tokens_text(scratch_d)} (from scratch)"


def answer_cell(row: dict, upcycled: FitResult | None, scratch: FitResult | None) -> str:
    """One cell: D2* [95%], a one-sided answer every sample agrees on, or "inconclusive: add ..."."""
    low, high = (math.nan if v is None else float(v) for v in row["d2_star_interval"])
    d2_star = row["d2_star"]
    crossings = row.get("crossings") or []
    start = (
        f"from {tokens_text(crossings[0]['d2'])} to "
        if len(crossings) > 1 and crossings[0]["better_after"] == "upcycle"
        else ""
    )
    if row["conclusive"]:
        extrapolated = not row["data_d2_range"][0] <= d2_star <= row["data_d2_range"][1]
        return f"{start}{tokens_text(d2_star)} [{tokens_text(low)}, {tokens_text(high)}]" + (
            " †" if extrapolated else ""
        )
    if row["status"] == "upcycle_better_in_range" and low == math.inf:
        return f"upcycle throughout (to {tokens_text(row['d2_range'][1])})"
    if row["status"] == "scratch_better_in_range" and high == 0:
        return f"from scratch throughout (from {tokens_text(row['d2_range'][0])})"
    estimate = (
        f"D2* ≈ {start}{tokens_text(d2_star)} [{tokens_text(low)}, {tokens_text(high)}]"
        if row["status"] == "crossing"
        else "upcycle better to the end of the search"
        if math.isinf(d2_star)
        else "from scratch better throughout"
    )
    return f"inconclusive ({estimate}): {runs_to_add(row, upcycled, scratch)}"


def _column(row: dict, variants: int) -> str:
    moe = f" {row['moe']}" if variants > 1 else ""
    return f"{row['method']}{moe}, {'counted' if row['count_sunk_cost'] else 'sunk'}"


def answer_tables(fits: FitSet, guidance: list[dict]) -> list[AnswerTable]:
    """One table per dense size (ascending N1), answering for each D1 (see the module docstring)."""
    chosen = preferred_pairs(fits, guidance)
    rows = [
        row
        for row in guidance
        if chosen[(row["method"], row["moe"], row["size"])] == (row["upcycled_fit"], row["scratch_fit"])
    ]
    variants = max((len({r["moe"] for r in rows if r["method"] == row["method"]}) for row in rows), default=1)
    out = []
    for size in sorted({row["size"] for row in rows}, key=lambda s: min(r["n1"] for r in rows if r["size"] == s)):
        mine = sorted(
            (row for row in rows if row["size"] == size),
            key=lambda r: (r["method"], r["moe"], r["count_sunk_cost"], r["d1"]),
        )
        columns = list(dict.fromkeys(_column(row, variants) for row in mine))
        d1_values = sorted({row["d1"] for row in mine})
        cells: dict[tuple[float, str], str] = {}
        data = []
        for row in mine:
            up, scratch = (fits.fitted(FitKey.parse(row[name])) for name in ("upcycled_fit", "scratch_fit"))
            text = answer_cell(row, up, scratch)
            cells[(row["d1"], _column(row, variants))] = text
            data.append(
                {
                    "d1": row["d1"],
                    "column": _column(row, variants),
                    "upcycled_fit": row["upcycled_fit"],
                    "scratch_fit": row["scratch_fit"],
                    "count_sunk_cost": row["count_sunk_cost"],
                    "d2_star": row["d2_star"],
                    "interval": row["d2_star_interval"],
                    "conclusive": row["conclusive"],
                    "text": text,
                }
            )
        laws = tuple(dict.fromkeys(f"`{row['upcycled_fit']}` vs `{row['scratch_fit']}`" for row in mine))
        out.append(
            AnswerTable(
                size=size,
                n1=mine[0]["n1"],
                n2=mine[0]["n2"],
                header=("D1", *columns),
                rows=tuple(
                    (tokens_text(d1), *(cells.get((d1, column), "—") for column in columns)) for d1 in d1_values
                ),
                laws=laws,
                data=tuple(data),
            )
        )
    return out


def _markdown_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def answer_lines(tables: list[AnswerTable], figure: str | None) -> list[str]:
    """The report's opening section: the tables, then the one figure."""
    lines = [
        "## Upcycle or train from scratch?",
        "",
        "Each cell: upcycle up to D2* second-stage tokens, beyond it the same MoE trained from scratch with "
        "the same compute (C = 6·N·D) is better; [95% bootstrap interval]; †: beyond the runs' D2. Sunk: the "
        "dense model exists anyway; counted: its 6·N1·D1 goes to the from-scratch run too ('from X to': from "
        "scratch also wins below X). Tokens: K = 1e3, M = 1e6, B = 1e9.",
        "",
    ]
    if not tables:
        return lines + ["No pair of fitted upcycled and from-scratch laws: no guidance.", ""]
    for table in tables:
        lines += [f"### {table.title}", _markdown_row(table.header), "|" + "---|" * len(table.header)]
        lines += [_markdown_row(row) for row in table.rows] + [""]
    if figure:
        lines += [f"![break_even]({figure})", ""]
    return lines
