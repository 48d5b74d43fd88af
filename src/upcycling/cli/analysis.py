"""The analysis stage's commands: aggregate, fit, report, predict (no torch)."""

from __future__ import annotations

import json

from upcycling.cli.common import job_spec, log
from upcycling.core.errors import InputError


def cmd_aggregate(args) -> int:
    import yaml

    from upcycling.analysis.store import aggregate
    from upcycling.core.metrics import code_version

    spec = job_spec(args, "aggregate")
    out = args.out or spec["out"]
    ds = aggregate(
        spec["runs"], out, config_text=yaml.safe_dump(spec["config"], sort_keys=False), code_version=code_version()
    )
    log.info("aggregated %d runs into %s (dims %s)", len(spec["runs"]), out, dict(ds.sizes))
    return 0


def cmd_fit(args) -> int:
    from upcycling.analysis.fitstage import fit_all
    from upcycling.analysis.store import load_losses
    from upcycling.core.publish import staging_dir

    settings = dict(job_spec(args, "fit")["fit"])
    if args.parameter_counts:
        settings["parameter_counts"] = args.parameter_counts
    if args.more_data_never_hurts:
        settings["more_data_never_hurts"] = True
    try:
        fits = fit_all(
            load_losses(args.store),
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
    from upcycling.analysis.fitstage import load_fits
    from upcycling.analysis.report import write_report
    from upcycling.analysis.store import load_losses

    fits = load_fits(args.fits)
    if not fits:
        raise InputError(f"no fits in {args.fits}: run `upcycling fit` first")
    written = write_report(load_losses(args.store), fits, None, args.out_dir)
    log.info("report: %s", ", ".join(str(path) for path in written.values()))
    return 0


def cmd_predict(args) -> int:
    from upcycling.analysis.advice import predict
    from upcycling.analysis.fitresult import to_jsonable
    from upcycling.analysis.fitstage import load_fits

    if args.top_k > args.experts:
        raise InputError(f"--top-k {args.top_k} is more than --experts {args.experts}: routing picks k of E experts")
    fits = load_fits(args.fits)
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
