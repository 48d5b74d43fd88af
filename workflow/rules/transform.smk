rule transform:
    """Dense export at D1 -> the second-stage method's initial export: the upcycled MoE (HF Mixtral,
    fresh routers), the dense model itself (continue), or a grown dense model (HF Llama)."""
    input:
        unpack(inputs_of("transform")),
    output:
        **outputs("transform"),
    log:
        log_of("transform"),
    conda:
        "../../envs/gpu.yml"
    threads: 1
    resources:
        **resources_of("transform"),
    params:
        spec=spec_of("transform"),
    shell:
        "upcycling transform --spec {params.spec:q} --results {R:q} >> {log:q} 2>&1"
