rule tokenize:
    """Corpus -> tokenizer.json, train.bin/val.bin token memmaps and meta.json."""
    output:
        train=R / "tokens" / "train.bin",
        val=R / "tokens" / "val.bin",
        meta=R / "tokens" / "meta.json",
        tokenizer=R / "tokens" / "tokenizer.json",
    log:
        LOGS / "tokenize.log",
    threads: 2
    conda:
        "../../envs/cpu.yml"
    shell:
        "RAYON_NUM_THREADS={threads} upcycling tokenize {CONFIG_ARGS} > {log} 2>&1"
