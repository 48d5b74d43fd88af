SCRATCH = "scratch/{size}/seed{seed}/e{experts}_k{top_k}_g{granularity}"
MOE_ARGS = "--size {wildcards.size} --seed {wildcards.seed} --experts {wildcards.experts} --top-k {wildcards.top_k} --granularity {wildcards.granularity}"


def upcycled_init(wildcards):
    """The first job of an upcycled chain starts from the upcycled weights."""
    first = WSD and sweep.previous_stable_point(config, "upcycled", int(wildcards.point)) is None
    return [rules.upcycle.output.weights.format(**wildcards)] if first else []


rule upcycled_stable:
    """WSD stable phase of an upcycled MoE."""
    input:
        init=upcycled_init,
        previous=stable_input("upcycled", UPCYCLED),
    output:
        R / UPCYCLED / "stable_{point}.json",
    log:
        LOGS / UPCYCLED / "stable_{point}.log",
    threads: 1
    resources:
        **resources_for("upcycled", "stable"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN + " --family upcycled --d1 {wildcards.d1} " + MOE_ARGS + " --stable {wildcards.point} > {log} 2>&1"


rule upcycled_final:
    """An upcycled run's end at D2: its decay (WSD) or whole cosine run; writes its metrics."""
    input:
        init=lambda wildcards: [] if WSD else [rules.upcycle.output.weights.format(**wildcards)],
        stable=decay_input("upcycled", UPCYCLED),
    output:
        R / UPCYCLED / "d2_{d2}" / "metrics.json",
    log:
        LOGS / UPCYCLED / "d2_{d2}.log",
    threads: 1
    resources:
        **resources_for("upcycled", "final"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN + " --family upcycled --d1 {wildcards.d1} " + MOE_ARGS + " --budget {wildcards.d2} > {log} 2>&1"


rule scratch_stable:
    """WSD stable phase of the same MoE trained from scratch (the guidance's baseline)."""
    input:
        meta=rules.tokenize.output.meta,
        previous=stable_input("scratch", SCRATCH),
    output:
        R / SCRATCH / "stable_{point}.json",
    log:
        LOGS / SCRATCH / "stable_{point}.log",
    threads: 1
    resources:
        **resources_for("scratch", "stable"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN + " --family scratch " + MOE_ARGS + " --stable {wildcards.point} > {log} 2>&1"


rule scratch_final:
    input:
        meta=rules.tokenize.output.meta,
        stable=decay_input("scratch", SCRATCH),
    output:
        R / SCRATCH / "d_{d}" / "metrics.json",
    log:
        LOGS / SCRATCH / "d_{d}.log",
    threads: 1
    resources:
        **resources_for("scratch", "final"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN + " --family scratch " + MOE_ARGS + " --budget {wildcards.d} > {log} 2>&1"
