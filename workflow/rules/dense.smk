rule dense_stable:
    """WSD stable phase of a dense model, continued from the previous stable point of its chain."""
    input:
        unpack(inputs_of("dense_stable")),
    output:
        **outputs("dense_stable"),
    params:
        spec=spec_of("dense_stable"),
    log:
        log_of("dense_stable"),
    threads: cpus_per_process(SWEEP)
    resources:
        **resources_of("dense_stable"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN


rule dense_final:
    """A dense run's end: its WSD decay (or a whole cosine run) to D1; metrics + Llama export."""
    input:
        unpack(inputs_of("dense_final")),
    output:
        **outputs("dense_final"),
    params:
        spec=spec_of("dense_final"),
    log:
        log_of("dense_final"),
    threads: cpus_per_process(SWEEP)
    resources:
        **resources_of("dense_final"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN
