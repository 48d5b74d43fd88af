rule tokenize:
    """Corpus -> tokenizer.json, train.bin/val.bin token memmaps and meta.json."""
    output:
        **outputs("tokenize"),
    params:
        spec=spec_of("tokenize"),
    log:
        log_of("tokenize"),
    threads: 2
    resources:
        **resources_of("tokenize"),
    conda:
        "../../envs/cpu.yml"
    shell:
        "RAYON_NUM_THREADS={threads} upcycling tokenize --spec {params.spec:q} --workdir {BASEDIR:q} >> {log} 2>&1"
