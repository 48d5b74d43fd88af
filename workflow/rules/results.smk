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
        "upcycling aggregate --spec {params.spec:q} >> {log} 2>&1"


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
        "OMP_NUM_THREADS=1 upcycling fit --spec {params.spec:q} --store {input.store} --out-dir {output}"
        " --workers {threads} >> {log} 2>&1"


rule report:
    """summary.md (findings first, then the tables), findings.json, guidance.json and the figures."""
    input:
        **inputs_of("report")({}),
    output:
        **outputs("report"),
        figures=[
            report(str(R / "report" / name), caption="../report/figures.rst", category="Scaling laws")
            for name in REPORT_FIGURES.values()
        ],
    log:
        log_of("report"),
    conda:
        "../../envs/cpu.yml"
    resources:
        **resources_of("report"),
    shell:
        "upcycling report --store {input.store} --fits {input.fits} --out-dir $(dirname {output.summary})"
        " >> {log} 2>&1"
