rule upcycle:
    """Dense export at D1 -> the MoE's initial export (HF Mixtral layout), routers fresh."""
    input:
        unpack(inputs_of("upcycle")),
    output:
        **outputs("upcycle"),
    params:
        spec=spec_of("upcycle"),
    log:
        log_of("upcycle"),
    threads: 1
    resources:
        **resources_of("upcycle"),
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling upcycle --spec {params.spec:q} >> {log} 2>&1"
