# The tokens stage as a scatter/gather (upcycling.data.tokens): the tokenizer once, one CPU job per
# corpus shard, and the gather, which writes meta.json (what every training job reads).


rule train_tokenizer:
    """Byte-level BPE trained once on a sample of every corpus file (or the given tokenizer.json)."""
    input:
        unpack(inputs_of("train_tokenizer")),
    output:
        **outputs("train_tokenizer"),
    log:
        log_of("train_tokenizer"),
    conda:
        "../../envs/cpu.yml"
    threads: SWEEP.tokenizer.threads
    resources:
        **resources_of("train_tokenizer"),
    params:
        spec=spec_of("train_tokenizer"),
    shell:
        "RAYON_NUM_THREADS={threads} upcycling train-tokenizer --spec {params.spec:q} --workdir {BASEDIR:q}"
        " --results {R:q} >> {log:q} 2>&1"


rule tokenize_shard:
    """One shard: a contiguous run of whole corpus files -> train.bin, val.bin, shard.json."""
    input:
        unpack(inputs_of("tokenize_shard")),
    output:
        **outputs("tokenize_shard"),
    log:
        log_of("tokenize_shard"),
    conda:
        "../../envs/cpu.yml"
    threads: SWEEP.tokenizer.threads
    resources:
        **resources_of("tokenize_shard"),
    params:
        spec=spec_of("tokenize_shard"),
    shell:
        "RAYON_NUM_THREADS={threads} upcycling tokenize-shard --spec {params.spec:q} --workdir {BASEDIR:q}"
        " --results {R:q} >> {log:q} 2>&1"


rule tokenize:
    """The gather: checks the shards against the plan, writes meta.json (totals and the shard list)."""
    input:
        unpack(inputs_of("tokenize")),
    output:
        **outputs("tokenize"),
    log:
        log_of("tokenize"),
    conda:
        "../../envs/cpu.yml"
    threads: 1
    resources:
        **resources_of("tokenize"),
    params:
        spec=spec_of("tokenize"),
    shell:
        "upcycling tokenize-gather --spec {params.spec:q} --results {R:q} >> {log:q} 2>&1"
