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
    """The scaling laws and their baselines, fitted with lmfit (Huber on log loss, bootstrap)."""
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


rule report:
    """Markdown summary and figures: law fits, residuals, the a3 effect, the break-even curve."""
    input:
        store=rules.aggregate.output,
        fits=rules.fit.output,
    output:
        summary=R / "report" / "summary.md",
        guidance=R / "report" / "guidance.json",
        figures=[
            report(R / "report" / name, caption="../report/figures.rst", category="Scaling laws")
            for name in ("loss_vs_d2.png", "residuals.png", "effective_exponent.png", "break_even.png",
                         "equal_compute.png")
        ],
    log:
        LOGS / "report.log",
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling report {CONFIG_ARGS} --store {input.store} --fits {input.fits}"
        " --out-dir $(dirname {output.summary}) > {log} 2>&1"
