DENSE = "dense/{size}/seed{seed}"


rule dense_stable:
    """WSD stable phase of a dense model, continued from the previous stable point of its chain."""
    input:
        meta=rules.tokenize.output.meta,
        previous=stable_input("dense", DENSE),
    output:
        R / DENSE / "stable_{point}.json",
    log:
        LOGS / DENSE / "stable_{point}.log",
    threads: 1
    resources:
        **resources_for("dense", "stable"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN + " --family dense --size {wildcards.size} --seed {wildcards.seed} --stable {wildcards.point} > {log} 2>&1"


rule dense_final:
    """A dense run's end: its WSD decay (or a whole cosine run) to D1; metrics + Llama export."""
    input:
        meta=rules.tokenize.output.meta,
        stable=decay_input("dense", DENSE),
    output:
        metrics=R / DENSE / "d1_{d1}" / "metrics.json",
        weights=R / DENSE / "d1_{d1}" / "hf" / "model.safetensors",
        hf_config=R / DENSE / "d1_{d1}" / "hf" / "config.json",
    log:
        LOGS / DENSE / "d1_{d1}.log",
    threads: 1
    resources:
        **resources_for("dense", "final"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN + " --family dense --size {wildcards.size} --seed {wildcards.seed} --budget {wildcards.d1} > {log} 2>&1"
