rule upcycled_stable:
    """WSD stable phase of an upcycled MoE (the first starts from the upcycled export)."""
    input:
        unpack(inputs_of("upcycled_stable")),
    output:
        **outputs("upcycled_stable"),
    params:
        spec=spec_of("upcycled_stable"),
    log:
        log_of("upcycled_stable"),
    threads: cpus_per_process(SWEEP)
    resources:
        **resources_of("upcycled_stable"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN


rule upcycled_final:
    """An upcycled run's end at D2: its decay (WSD) or whole cosine run; writes its metrics."""
    input:
        unpack(inputs_of("upcycled_final")),
    output:
        **outputs("upcycled_final"),
    params:
        spec=spec_of("upcycled_final"),
    log:
        log_of("upcycled_final"),
    threads: cpus_per_process(SWEEP)
    resources:
        **resources_of("upcycled_final"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN


rule scratch_stable:
    """WSD stable phase of the same MoE trained from scratch (the guidance's baseline)."""
    input:
        unpack(inputs_of("scratch_stable")),
    output:
        **outputs("scratch_stable"),
    params:
        spec=spec_of("scratch_stable"),
    log:
        log_of("scratch_stable"),
    threads: cpus_per_process(SWEEP)
    resources:
        **resources_of("scratch_stable"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN


rule scratch_final:
    """A from-scratch MoE run's end at D: its decay (WSD) or whole cosine run; writes its metrics."""
    input:
        unpack(inputs_of("scratch_final")),
    output:
        **outputs("scratch_final"),
    params:
        spec=spec_of("scratch_final"),
    log:
        log_of("scratch_final"),
    threads: cpus_per_process(SWEEP)
    resources:
        **resources_of("scratch_final"),
    conda:
        "../../envs/gpu.yml"
    shell:
        TRAIN
