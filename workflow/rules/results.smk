rule aggregate:
    """Every run's metrics JSON -> one xarray/zarr store (NaN where a combination was not run)."""
    input:
        unpack(inputs_of("aggregate")),
    output:
        directory(outputs("aggregate")["store"]),
    params:
        spec=spec_of("aggregate"),
    log:
        log_of("aggregate"),
    resources:
        **resources_of("aggregate"),
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling aggregate --spec {params.spec:q} >> {log} 2>&1"


rule fit:
    """The scaling laws and their baselines per method (Huber on log loss, bootstrap, diagnostics)."""
    input:
        **inputs_of("fit")({}),
    output:
        directory(outputs("fit")["fits"]),
    params:
        spec=spec_of("fit"),
    log:
        log_of("fit"),
    threads: 2
    resources:
        **resources_of("fit"),
    conda:
        "../../envs/cpu.yml"
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
    resources:
        **resources_of("report"),
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling report --store {input.store} --fits {input.fits} --out-dir $(dirname {output.summary})"
        " >> {log} 2>&1"
