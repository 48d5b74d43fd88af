UPCYCLED = "upcycled/{size}/seed{seed}/d1_{d1}/e{experts}_k{top_k}_g{granularity}"


rule upcycle:
    """Dense checkpoint at D1 -> MoE initial checkpoint (HF Mixtral layout), routers fresh."""
    input:
        weights=rules.dense_final.output.weights,
        hf_config=rules.dense_final.output.hf_config,
    output:
        weights=R / UPCYCLED / "init" / "model.safetensors",
        hf_config=R / UPCYCLED / "init" / "config.json",
    log:
        LOGS / UPCYCLED / "upcycle.log",
    threads: 1
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling upcycle {CONFIG_ARGS} --size {wildcards.size} --seed {wildcards.seed} --d1 {wildcards.d1}"
        " --experts {wildcards.experts} --top-k {wildcards.top_k} --granularity {wildcards.granularity} > {log} 2>&1"
