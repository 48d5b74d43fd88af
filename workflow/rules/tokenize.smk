# Tokens stage as a scatter/gather (src/upcycling/tokenize.py, layout in src/upcycling/tokens.py):
# train_tokenizer (once) -> tokenize_shard (one CPU job per corpus shard) -> tokenize (the gather:
# meta.json, which every training rule reads).
import functools
import shlex

from upcycling import tokens as token_layout
from upcycling.corpus import estimated_text_bytes, resolve_sources

TOKENS = R / "tokens"
# Relative corpus paths start at the repository, as in validate_config; jobs are told the same.
_CORPUS = resolve_sources(config["corpus"]["paths"], workflow.basedir)
_LABELS = [source.label for source in _CORPUS]
_SHARDS = config["corpus"]["shards"]
_PLAN = token_layout.shard_plan([source.size for source in _CORPUS], _SHARDS)
_SHARD_NAMES = [token_layout.shard_name(index, _SHARDS) for index in range(_SHARDS)]
TOKENIZE_ARGS = f"{CONFIG_ARGS} --workdir {shlex.quote(str(workflow.basedir))}"
# What decides the documents and their split: a change reruns the jobs (Snakemake's params trigger).
_CORPUS_PARAMS = {key: config["corpus"][key] for key in ("text_field", "val_fraction", "split_seed", "select")}


@functools.lru_cache(maxsize=None)
def _tokenize_job(rule, shard=None):
    """The job's estimate (runtime, memory) from its corpus bytes; only computed for jobs that run."""
    if shard is not None:
        files = _PLAN[token_layout.parse_shard_name(shard)[0]]
    else:  # the tokenizer's sample is capped by the corpus; the gather reads none of it
        files = range(len(_CORPUS)) if rule == "train_tokenizer" else []
    estimated = {i: estimated_text_bytes(_CORPUS[i]) for i in files}  # other files' bytes do not matter here
    text_bytes = [estimated.get(i, 0) for i in range(len(_CORPUS))]
    jobs = token_layout.tokenize_jobs(config, TOKENS, _LABELS, [s.size for s in _CORPUS], text_bytes)
    return next(job for job in jobs if job.rule == rule and job.wildcards.get("shard") == shard)


def _tokenize_resources(rule):
    return {
        name: (lambda wildcards, name=name: token_layout.slurm_resources(
            _tokenize_job(rule, getattr(wildcards, "shard", None)), config)[name])
        for name in ("runtime", "mem_mb", "cpus_per_task")
    }


rule train_tokenizer:
    """Byte-level BPE trained once on a sample of every corpus file (or the given tokenizer.json)."""
    input:
        [source.path for source in _CORPUS],
    output:
        TOKENS / "tokenizer.json",
    params:
        tokenizer={k: v for k, v in config["tokenizer"].items() if k not in ("threads", "tokens_per_s_per_core",
                                                                            "bytes_per_token")},
        corpus=_CORPUS_PARAMS,
    log:
        LOGS / "tokens" / "train_tokenizer.log",
    threads: config["tokenizer"]["threads"]
    resources:
        **_tokenize_resources("train_tokenizer"),
    conda:
        "../../envs/cpu.yml"
    shell:
        "RAYON_NUM_THREADS={threads} upcycling train-tokenizer {TOKENIZE_ARGS} > {log} 2>&1"


rule tokenize_shard:
    """One shard: a contiguous run of whole corpus files -> train.bin, val.bin, shard.json."""
    input:
        tokenizer=TOKENS / "tokenizer.json",
        corpus=lambda wildcards: [_CORPUS[i].path for i in _PLAN[token_layout.parse_shard_name(wildcards.shard)[0]]],
    output:
        train=TOKENS / token_layout.SHARDS_DIR / "{shard}" / "train.bin",
        val=TOKENS / token_layout.SHARDS_DIR / "{shard}" / "val.bin",
        sidecar=TOKENS / token_layout.SHARDS_DIR / "{shard}" / "shard.json",
    wildcard_constraints:
        shard="|".join(_SHARD_NAMES),
    params:
        files=lambda wildcards: [_LABELS[i] for i in _PLAN[token_layout.parse_shard_name(wildcards.shard)[0]]],
        corpus=_CORPUS_PARAMS,
        eot_token=config["tokenizer"]["eot_token"],
    log:
        LOGS / "tokens" / "shard_{shard}.log",
    threads: config["tokenizer"]["threads"]
    resources:
        **_tokenize_resources("tokenize_shard"),
    conda:
        "../../envs/cpu.yml"
    shell:
        "RAYON_NUM_THREADS={threads} upcycling tokenize-shard {TOKENIZE_ARGS} --shard {wildcards.shard} > {log} 2>&1"


rule tokenize:
    """The gather: checks the shards against the plan, writes meta.json (totals and the shard list)."""
    input:
        tokenizer=TOKENS / "tokenizer.json",
        shards=expand(TOKENS / token_layout.SHARDS_DIR / "{shard}" / "shard.json", shard=_SHARD_NAMES),
    output:
        meta=TOKENS / "meta.json",
    log:
        LOGS / "tokens" / "gather.log",
    threads: 1
    resources:
        **_tokenize_resources("tokenize"),
    conda:
        "../../envs/cpu.yml"
    shell:
        "upcycling tokenize-gather {TOKENIZE_ARGS} > {log} 2>&1"
