"""The analysis stage's commands: aggregate, fit, report, predict (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from upcycling.cli.common import job_spec, log, results_root
from upcycling.core.errors import InputError


def _store(path: str):
    """The results store at ``path``, or InputError naming it and what makes it."""
    from upcycling.analysis.store import load_losses

    made_by = "`upcycling aggregate` writes it (the pipeline's aggregate rule: snakemake --until aggregate)"
    if not Path(path).is_dir():
        raise InputError(f"--store {path} does not exist: {made_by}")
    try:
        return load_losses(path)
    except (OSError, KeyError, ValueError) as exc:  # zarr's "no group/array here" errors are among these
        raise InputError(f"--store {path} is not a results store ({type(exc).__name__}: {exc}): {made_by}") from None


def _fits(directory: str) -> dict:
    """The fits in ``directory``, or InputError naming the file that is cut short or is not a fit."""
    from upcycling.analysis.fitresult import FitResult
    from upcycling.analysis.fitstage import load_fits

    try:
        return load_fits(directory)
    except (ValueError, KeyError, TypeError, AttributeError):  # json.JSONDecodeError is a ValueError
        for path in sorted(Path(directory).glob("*.json")):
            try:
                FitResult.load(path)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InputError(
                    f"{path} is not a readable fit ({type(exc).__name__}: {exc}): it was cut short or edited; "
                    "rerun `upcycling fit` (snakemake --forcerun fit) to write the fits again"
                ) from None
        raise


def cmd_aggregate(args) -> int:
    import yaml

    from upcycling.analysis.store import aggregate
    from upcycling.core.metrics import code_version

    spec = job_spec(args, "aggregate")
    results = results_root(args)  # the spec names the metrics files relative to the results directory
    out = args.out or results / spec["out"]
    runs = {str(results / path): fingerprint for path, fingerprint in spec["runs"].items()}
    ds = aggregate(runs, out, config_text=yaml.safe_dump(spec["config"], sort_keys=False), code_version=code_version())
    log.info("aggregated %d runs into %s (dims %s)", len(spec["runs"]), out, dict(ds.sizes))
    return 0


def cmd_fit(args) -> int:
    from upcycling.analysis.fitstage import fit_all
    from upcycling.core.publish import staging_dir

    settings = dict(job_spec(args, "fit")["fit"])
    if args.parameter_counts:
        settings["parameter_counts"] = args.parameter_counts
    if args.more_data_never_hurts:
        settings["more_data_never_hurts"] = True
    try:
        fits = fit_all(
            _store(args.store),
            settings,
            out_dir=None,
            workers=args.workers,
            counts=settings["parameter_counts"],
            monotone=settings["more_data_never_hurts"],
        )
    except ValueError as error:  # a store without the chosen parameter counts
        raise InputError(str(error)) from None
    with staging_dir(args.out_dir) as staged:  # all fits appear together, or none
        for key, fit in fits.items():
            fit.save(staged / f"{key}.json")
    statuses = [fit.status for fit in fits.values()]
    log.info(
        "fit: %d laws fitted (%d converged, %d at a bound, %d singular, %d not converged), %d skipped -> %s",
        sum(s != "skipped" for s in statuses),
        statuses.count("converged"),
        statuses.count("at_bound"),
        statuses.count("singular"),
        statuses.count("not_converged"),
        statuses.count("skipped"),
        args.out_dir,
    )
    return 0


def cmd_report(args) -> int:
    from upcycling.analysis.report import write_report

    store = _store(args.store)
    fits = _fits(args.fits)
    if not fits:
        raise InputError(f"no fits in {args.fits}: run `upcycling fit` first")
    written = write_report(store, fits, None, args.out_dir)
    log.info("report: %s", ", ".join(str(path) for path in written.values()))
    return 0


def cmd_predict(args) -> int:
    from upcycling.analysis.advice import predict
    from upcycling.analysis.fitresult import to_jsonable

    if args.top_k > args.experts:
        raise InputError(f"--top-k {args.top_k} is more than --experts {args.experts}: routing picks k of E experts")
    fits = _fits(args.fits)
    if not fits:
        raise InputError(f"no fits in {args.fits}: run the pipeline (or `upcycling fit`) first")
    try:
        result = predict(
            fits,
            args.n1,
            args.d1,
            args.d2,
            args.experts,
            args.top_k,
            args.granularity,
            method=args.method,
            count_sunk_cost=args.count_sunk_cost,
        )
    except ValueError as error:
        raise InputError(str(error)) from None
    print(json.dumps(to_jsonable(result), indent=1))
    return 0
