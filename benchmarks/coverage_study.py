"""Coverage of the fits' 95% intervals on synthetic truths of a paper-like grid (docs/fits.md).

Grid: 5 D1 from 10B to 200B tokens x 5 D2 from 5B to 100B (log-spaced), the dataset law
L = A D1^-a1 D2^(-a2 + a3 ln D1) + E with E = 2 and alpha2 > alpha1 > alpha3 > 0 (in tokens),
log-normal noise; each draw is fitted with the default settings (``fit_law``; held-out refits
off: they do not enter the intervals). Per Huber delta, truth, noise and status the table gives
how often the status occurs, how many parameters the fit labels identified, how many of those
the 95% interval covers, and the median |alpha3 error|.

    python benchmarks/coverage_study.py --draws 40 --bootstrap 16 --workers 2
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from upcycling.analysis import laws
from upcycling.analysis.fitting import fit_law

D1 = np.geomspace(10e9, 200e9, 5)
D2 = np.geomspace(5e9, 100e9, 5)
STATUS_ORDER = ("converged", "at_bound", "singular", "not_converged")


def truth(alpha3: float, slope1: float, slope2: float, term: float, irreducible: float = 2.0) -> dict[str, float]:
    """Dataset-law coefficients from alpha3, the local D1 and D2 slopes and the power term's
    size at the grid's centre (tokens)."""
    log_c1, log_c2 = float(np.log(D1).mean()), float(np.log(D2).mean())
    alpha1, alpha2 = slope1 + alpha3 * log_c2, slope2 + alpha3 * log_c1
    return dict(
        A=term * math.exp(alpha1 * log_c1 + slope2 * log_c2), alpha1=alpha1, alpha2=alpha2, alpha3=alpha3, E=irreducible
    )


# "paper": the case (the power term a quarter of E at the centre, shallow slopes: E
# trades off against the power terms); "strong": a larger, steeper power term
TRUTHS = {"paper": truth(0.01, 0.05, 0.2, 0.5), "strong": truth(0.02, 0.1, 0.3, 1.0)}


def one_fit(args):
    name, noise, seed, delta, bootstrap = args
    true = TRUTHS[name]
    d1, d2 = (a.ravel() for a in np.meshgrid(D1, D2, indexing="ij"))
    rng = np.random.default_rng([seed, int(noise * 1e4), sorted(TRUTHS).index(name)])
    loss = laws.dataset(d1, d2, **true) * np.exp(rng.normal(0.0, noise, d1.size))
    fit = fit_law(
        "dataset", {"d1": d1, "d2": d2, "loss": loss}, huber_delta=delta, n_bootstrap=bootstrap, holdout=False
    )
    identified = [p for p in fit.params if fit.identification[p]["identified"]]
    inside = [p for p in fit.params if fit.interval[p][0] <= true[p] <= fit.interval[p][1]]
    covered = [p for p in identified if p in inside]
    error = abs(fit.params["alpha3"] - true["alpha3"])
    return (name, noise, delta, fit.status, len(identified), len(covered), error, len(inside), len(fit.params))


def table(rows) -> str:
    groups: dict[tuple, list] = defaultdict(list)
    totals: dict[tuple, int] = defaultdict(int)
    for name, noise, delta, status, n_id, n_cov, error, n_in, n_all in rows:
        groups[(delta, name, noise, status)].append((n_id, n_cov, error, n_in, n_all))
        totals[(delta, name, noise)] += 1
    lines = [
        "| Huber delta | truth | noise | status | fits | identified params | covered | coverage | "
        "all params covered | median abs err alpha3 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], STATUS_ORDER.index(k[3]))):
        delta, name, noise, status = key
        entries = groups[key]
        n_id = sum(e[0] for e in entries)
        n_cov = sum(e[1] for e in entries)
        coverage = f"{100 * n_cov / n_id:.0f}%" if n_id else "-"
        share = f"{len(entries)} / {totals[(delta, name, noise)]}"
        median = float(np.median([e[2] for e in entries]))
        everything = f"{100 * sum(e[3] for e in entries) / sum(e[4] for e in entries):.0f}%"
        lines.append(
            f"| {delta:g} | {name} | {100 * noise:g}% | {status} | {share} | {n_id} | {n_cov} | {coverage} | "
            f"{everything} | {median:.4f} |"
        )
    for delta in sorted({k[0] for k in groups}):
        entries = [e for k, v in groups.items() if k[0] == delta for e in v]
        n_id, n_cov = sum(e[0] for e in entries), sum(e[1] for e in entries)
        median = float(np.median([e[2] for e in entries]))
        everything = f"{100 * sum(e[3] for e in entries) / sum(e[4] for e in entries):.0f}%"
        lines.append(
            f"| {delta:g} | all | all | all | {len(entries)} | {n_id} | {n_cov} | {100 * n_cov / max(n_id, 1):.0f}% | "
            f"{everything} | {median:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=40, help="noise draws per truth and noise level")
    parser.add_argument("--bootstrap", type=int, default=16, help="bootstrap resamples per fit (not in the intervals)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deltas", default="1e-3,1e-2", help="Huber deltas, comma-separated")
    parser.add_argument("--noise", default="0.003,0.01", help="log-normal noise levels, comma-separated")
    parser.add_argument("--truths", default=",".join(TRUTHS), help="truths, comma-separated")
    args = parser.parse_args(argv)
    jobs = [
        (name, float(noise), seed, float(delta), args.bootstrap)
        for delta in args.deltas.split(",")
        for name in args.truths.split(",")
        for noise in args.noise.split(",")
        for seed in range(args.draws)
    ]
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(one_fit, jobs, chunksize=4))
    print(table(rows))
    print(f"\n{len(jobs)} fits in {time.monotonic() - started:.0f} s ({args.workers} workers)")
    for name, values in TRUTHS.items():
        print(f"truth {name}: " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
