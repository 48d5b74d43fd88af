rule aggregate:
    """Every run's metrics JSON -> one xarray/zarr store (NaN where a combination was not run)."""
    input:
        unpack(inputs_of("aggregate")),
    output:
        directory(outputs("aggregate")["store"]),
    log:
        log_of("aggregate"),
    conda:
        "../../envs/cpu.yml"
    resources:
        **resources_of("aggregate"),
    params:
        spec=spec_of("aggregate"),
    shell:
        "upcycling aggregate --spec {params.spec:q} --results {R:q} >> {log:q} 2>&1"


rule fit:
    """The scaling laws and their baselines per method (Huber on log loss, bootstrap, diagnostics)."""
    input:
        **inputs_of("fit")({}),
    output:
        directory(outputs("fit")["fits"]),
    log:
        log_of("fit"),
    conda:
        "../../envs/cpu.yml"
    threads: 2
    resources:
        **resources_of("fit"),
    params:
        spec=spec_of("fit"),
    shell:
        "OMP_NUM_THREADS=1 upcycling fit --spec {params.spec:q} --store {input.store:q} --out-dir {output:q}"
        " --workers {threads} >> {log:q} 2>&1"


REPORT_DIR = str(R / "report")  # where the report's outputs go (outputs("report"): under it)


rule report:
    """summary.md (the upcycle-or-scratch answer first, then the findings and the details),
    summary.html (the same, for --report), findings.json, guidance.json and the figures."""
    input:
        **inputs_of("report")({}),
    output:
        **outputs("report"),
        answer=report(
            str(R / "report" / "summary.html"), caption="../report/summary.rst", category="1. Upcycle or from scratch?"
        ),
        figures=[
            report(
                str(R / "report" / name),
                caption=f"../report/{name.removesuffix('.png')}.rst",
                category="2. Scaling laws",
            )
            for name in REPORT_FIGURES.values()
        ],
    log:
        log_of("report"),
    conda:
        "../../envs/cpu.yml"
    resources:
        **resources_of("report"),
    shell:
        "upcycling report --store {input.store:q} --fits {input.fits:q} --out-dir {REPORT_DIR:q} >> {log:q} 2>&1"
