rule aggregate:
    """Every run's metrics JSON -> one xarray/zarr store (NaN where a combination was not run)."""
    input:
        lambda wildcards: [str(path) for path in sweep.all_metrics(config)],
    output:
        directory(R / "losses.zarr"),
    log:
        LOGS / "aggregate.log",
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling aggregate {CONFIG_ARGS} --out {output} {input} > {log} 2>&1"


rule fit:
    """The scaling laws and their baselines per method (Huber on log loss, bootstrap, diagnostics)."""
    input:
        rules.aggregate.output,
    output:
        directory(R / "fits"),
    log:
        LOGS / "fit.log",
    threads: 2
    conda:
        "../../envs/cpu.yml"
    shell:
        "OMP_NUM_THREADS=1 upcycling fit {CONFIG_ARGS} --store {input} --out-dir {output} --workers {threads} > {log} 2>&1"


from upcycling.figures import FIGURES as REPORT_FIGURES  # the report's figures, listed once


rule report:
    """summary.md (findings first, then the tables), findings.json, guidance.json and the figures."""
    input:
        store=rules.aggregate.output,
        fits=rules.fit.output,
    output:
        summary=R / "report" / "summary.md",
        findings=R / "report" / "findings.json",
        guidance=R / "report" / "guidance.json",
        figures=[
            report(R / "report" / name, caption="../report/figures.rst", category="Scaling laws")
            for name in REPORT_FIGURES.values()
        ],
    log:
        LOGS / "report.log",
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling report {CONFIG_ARGS} --store {input.store} --fits {input.fits}"
        " --out-dir $(dirname {output.summary}) > {log} 2>&1"
