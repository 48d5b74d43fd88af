"""The tokens directory: its layout, the shard plan, what each tokenize job costs, and reading it back.

Public (pure unless noted): ``shard_plan(sizes, shards)``, ``tokens_outputs(tokens_dir, shards)``
(every path the tokenize rules write), ``tokenize_jobs(cfg, tokens_dir, sources, text_bytes)``
(the jobs with their estimated runtime and memory), ``estimate_tokenize_seconds(text_bytes,
cpus)``, and ``load_tokens(tokens_dir)`` (I/O: what training reads). Formats: docs/contracts.md,
"Tokens".

Layout of ``<results_dir>/tokens/``::

    tokenizer.json                          rule train_tokenizer (trained on a sample, or the given one)
    tokenizer.training.json                   and, for a trained one, the vocabulary size asked for and reached
    shards/00000-of-00004/train.bin         rule tokenize_shard, one job per shard: flat token
    shards/00000-of-00004/val.bin             memmaps (uint16/uint32) and their sidecar
    shards/00000-of-00004/shard.json
    ...
    meta.json                               rule tokenize (the gather): totals and the shard list

A shard is a contiguous run of whole corpus files, so the shards' streams, concatenated in order,
are the one-shard stream: documents, split and order do not depend on the shard count, and
neither do the batches that training draws from the stream.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from upcycling.core.errors import InputError
from upcycling.core.publish import sha256_file

FORMAT_VERSION = 2
SHARDS_DIR = "shards"
SHARD_FILES = ("train.bin", "val.bin", "shard.json")

# Throughput of the tokens stage, for runtime estimates: benchmarks/bench_tokenize.py --scale on
# this project's 2-core machine (1 GB of English text as .jsonl.zst, byte-level BPE with a 32k
# vocabulary): 0.83M tokens per CPU second, 3.67 bytes per token, 1.84x from 1 to 2 threads, a
# 271 MB/s scan pass. tokenizer.tokens_per_s_per_core and tokenizer.bytes_per_token override the
# first two per cluster and corpus.
TOKENS_PER_S_PER_CORE = 800_000
BYTES_PER_TOKEN = 3.7
PARALLEL_EFFICIENCY = 0.85  # each core beyond the first adds this much of one (measured: 0.84)
READ_BYTES_PER_S = 100e6  # the single-threaded scan pass (read, decompress, parse, hash): measured 271 MB/s
# Peak memory: a shard job holds two batches of text and ids (BATCH_CHARS) plus the tokenizer
# (measured: 360 MB at 1 thread, 387 MB at 2, on 1 GB); training the tokenizer holds its sample's
# word counts and pair statistics (not measured at scale: a guess that errs high).
TOKENIZE_MEM_MB = 2000
TOKENIZER_TRAIN_MEM_PER_SAMPLE_BYTE = 6.0
TOKENIZER_TRAIN_BYTES_PER_S_PER_CORE = 3e6  # measured: a 20 MB sample in 4.0 s on 2 threads


class TokenFilesError(InputError):
    """Token files that do not match their meta.json (or are missing)."""


# ----------------------------------------------------------------------------------------------
# Layout


def shard_name(index: int, count: int) -> str:
    return f"{index:05d}-of-{count:05d}"


def tokenizer_path(tokens_dir: str | os.PathLike) -> Path:
    return Path(tokens_dir) / "tokenizer.json"


def tokenizer_record_path(tokenizer_file: str | os.PathLike) -> Path:
    """Beside a trained tokenizer.json: the vocabulary size asked for and reached (tokenizer.json's
    format has no room for it); the gather copies it into meta.json."""
    return Path(tokenizer_file).with_suffix(".training.json")


def meta_path(tokens_dir: str | os.PathLike) -> Path:
    return Path(tokens_dir) / "meta.json"


def shard_dir(tokens_dir: str | os.PathLike, index: int, count: int) -> Path:
    return Path(tokens_dir) / SHARDS_DIR / shard_name(index, count)


def tokens_outputs(tokens_dir: str | os.PathLike, shards: int) -> dict[str, list[Path]]:
    """Every file the tokenize rules write, by rule."""
    shard_files = [shard_dir(tokens_dir, i, shards) / name for i in range(shards) for name in SHARD_FILES]
    return {
        "train_tokenizer": [tokenizer_path(tokens_dir)],
        "tokenize_shard": shard_files,
        "tokenize": [meta_path(tokens_dir)],
    }


# ----------------------------------------------------------------------------------------------
# The shard plan


def shard_plan(sizes: Sequence[int], shards: int) -> list[range]:
    """Which files (by index) go to which shard: contiguous runs of whole files, balanced by size.

    Shard k starts at the file where the running total of sizes comes nearest to k/shards of the
    whole, with at least one file per shard. A pure function of the sizes and the shard count."""
    count = len(sizes)
    if shards < 1 or shards > count:
        raise ValueError(f"{shards} shards cannot split {count} files: give 1 to {count} shards")
    before = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.float64))])  # bytes before file i
    total = before[-1]
    starts = [0]
    for k in range(1, shards):
        target = total * k / shards
        start = int(np.searchsorted(before, target))  # first file with >= target bytes before it
        if start > 0 and target - before[start - 1] < before[start] - target:
            start -= 1  # the nearer cut
        # Leave room: every earlier shard and every later one gets at least one file.
        starts.append(min(max(start, starts[-1] + 1), count - (shards - k)))
    return [range(a, b) for a, b in zip(starts, starts[1:] + [count])]


# ----------------------------------------------------------------------------------------------
# What the jobs cost


def estimate_tokenize_seconds(
    text_bytes: float,
    cpus: int,
    *,
    tokens_per_s_per_core: float = TOKENS_PER_S_PER_CORE,
    bytes_per_token: float = BYTES_PER_TOKEN,
) -> float:
    """Seconds a tokenize job needs for text_bytes of text on cpus cores (no margin): the scan
    pass (one thread) plus encoding (all cores, PARALLEL_EFFICIENCY each beyond the first)."""
    cores = 1 + (max(cpus, 1) - 1) * PARALLEL_EFFICIENCY
    return text_bytes / READ_BYTES_PER_S + text_bytes / bytes_per_token / (tokens_per_s_per_core * cores)


def estimate_tokenizer_seconds(sample_bytes: float, cpus: int) -> float:
    cores = 1 + (max(cpus, 1) - 1) * PARALLEL_EFFICIENCY
    return sample_bytes / READ_BYTES_PER_S + sample_bytes / (TOKENIZER_TRAIN_BYTES_PER_S_PER_CORE * cores)


@dataclass(frozen=True)
class TokenizeJob:
    rule: str  # train_tokenizer | tokenize_shard | tokenize
    wildcards: dict
    outputs: list[Path]
    text_bytes: int  # text it reads (estimated)
    seconds: float  # estimated compute, no margin
    cpus: int
    mem_mb: int
    files: list[str] = field(default_factory=list)  # corpus files it reads (labels); all: the sample


def tokenize_jobs(
    cfg: dict, tokens_dir: str | os.PathLike, labels: Sequence[str], sizes: Sequence[int], text_bytes: Sequence[int]
) -> list[TokenizeJob]:
    """The tokens stage's jobs for the corpus files (labels, bytes on disk, estimated text bytes).

    A given tokenizer.json makes train_tokenizer a copy; otherwise it reads tokenizer.sample_bytes."""
    corpus, tokenizer = cfg["corpus"], cfg["tokenizer"]
    shards, cpus = corpus.get("shards", 1), tokenizer.get("threads", 2)
    rates = {
        "tokens_per_s_per_core": tokenizer.get("tokens_per_s_per_core", TOKENS_PER_S_PER_CORE),
        "bytes_per_token": tokenizer.get("bytes_per_token", BYTES_PER_TOKEN),
    }
    outputs = tokens_outputs(tokens_dir, shards)
    if tokenizer.get("path"):
        sample, seconds, mem_mb = 0, 10.0, TOKENIZE_MEM_MB
    else:
        sample = min(int(tokenizer.get("sample_bytes", 10**9)), int(sum(text_bytes)))
        seconds = estimate_tokenizer_seconds(sample, cpus)
        mem_mb = TOKENIZE_MEM_MB + math.ceil(sample * TOKENIZER_TRAIN_MEM_PER_SAMPLE_BYTE / 2**20)
    jobs = [TokenizeJob("train_tokenizer", {}, outputs["train_tokenizer"], sample, seconds, cpus, mem_mb, list(labels))]
    for index, files in enumerate(shard_plan(sizes, shards)):
        name = shard_name(index, shards)
        shard_bytes = int(sum(text_bytes[i] for i in files))
        jobs.append(
            TokenizeJob(
                "tokenize_shard",
                {"shard": name},
                [shard_dir(tokens_dir, index, shards) / f for f in SHARD_FILES],
                shard_bytes,
                estimate_tokenize_seconds(shard_bytes, cpus, **rates),
                cpus,
                TOKENIZE_MEM_MB,
                [labels[i] for i in files],
            )
        )
    jobs.append(TokenizeJob("tokenize", {}, outputs["tokenize"], 0, 10.0, 1, 1000))
    return jobs


def slurm_resources(job: TokenizeJob, cfg: dict) -> dict:
    """What a tokenize job asks Slurm for: runtime (minutes, with the config's margin and start-up),
    memory and cores."""
    slurm = cfg.get("slurm", {})
    runtime = math.ceil(job.seconds * slurm.get("runtime_margin", 1.5) / 60 + slurm.get("startup_minutes", 5))
    return {"runtime": runtime, "mem_mb": job.mem_mb, "cpus_per_task": job.cpus}


# ----------------------------------------------------------------------------------------------
# Reading the tokens back


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def load_tokens(directory: str | os.PathLike) -> tuple:
    """(train stream, validation stream, meta) of a tokens directory, checked against meta.json.

    Each stream (upcycling.data.windows.TokenStream) reads its shards' memmaps as one sequence of ids;
    nothing is loaded into memory."""
    from upcycling.data.windows import (
        TokenStream,
    )  # torch: imported where training reads tokens, not when jobs are planned

    directory = Path(directory)
    rebuild = "delete the directory and re-run the tokens stage"
    path = meta_path(directory)
    if not path.is_file():
        raise TokenFilesError(f"{path} does not exist: run the tokens stage first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenFilesError(f"{path} is not valid JSON ({exc}): {rebuild}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise TokenFilesError(
            f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}: {rebuild}"
        )
    if meta.get("dtype") not in ("uint16", "uint32") or meta["dtype"] != token_dtype(meta["vocab_size"]).name:
        raise TokenFilesError(
            f"{path}: dtype {meta.get('dtype')!r} does not fit vocab_size {meta.get('vocab_size')}: {rebuild}"
        )
    dtype = np.dtype(meta["dtype"])
    tokenizer = directory / meta.get("tokenizer", "tokenizer.json")
    if not tokenizer.is_file() or sha256_file(tokenizer) != meta["tokenizer_sha256"]:
        raise TokenFilesError(
            f"{tokenizer} is missing or is not the tokenizer that made these tokens "
            f"(sha256 differs from meta.json): {rebuild}"
        )
    streams = []
    for split in ("train", "val"):
        parts = []
        for shard in meta["shards"]:
            file = directory / shard["path"] / f"{split}.bin"
            tokens = shard[f"{split}_tokens"]
            actual = file.stat().st_size if file.is_file() else None
            if actual != tokens * dtype.itemsize:
                raise TokenFilesError(
                    f"{file}: {'missing' if actual is None else f'{actual} bytes'}, but meta.json says "
                    f"{tokens} {dtype.name} tokens ({tokens * dtype.itemsize} bytes): the files are "
                    f"partial or from another run; {rebuild}"
                )
            if tokens:  # an empty file cannot be memory-mapped
                parts.append(np.memmap(file, dtype=dtype, mode="r"))
        stream = TokenStream(parts, vocab_size=meta["vocab_size"])
        if len(stream) != meta[f"{split}_tokens"] or not len(stream):
            raise TokenFilesError(
                f"{path}: {split}_tokens={meta[f'{split}_tokens']}, but its shards hold {len(stream)}: {rebuild}"
            )
        streams.append(stream)
    for shard in meta["shards"]:
        largest = largest_token_id(directory / shard["path"], shard, dtype)
        if largest >= meta["vocab_size"]:
            raise TokenFilesError(
                f"{directory / shard['path']}: token id {largest} is not below meta.json's vocab_size "
                f"{meta['vocab_size']}: the token files and meta.json do not belong together (vocab_size "
                f"edited, or shards of another tokenizer); {rebuild}"
            )
    return streams[0], streams[1], meta


def largest_token_id(shard_dir: Path, entry: dict, dtype: np.dtype) -> int:
    """A shard's largest id: as meta.json or its shard.json recorded it when it was written, else
    (tokens made before the record existed) one pass over its memmaps."""
    if "max_token_id" in entry:
        return int(entry["max_token_id"])
    try:
        return int(json.loads((shard_dir / "shard.json").read_text())["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    largest = -1
    for split in ("train", "val"):
        if entry[f"{split}_tokens"]:
            ids = np.memmap(shard_dir / f"{split}.bin", dtype=dtype, mode="r")
            for start in range(0, len(ids), 1 << 26):  # 64M ids (128-256 MB) at a time
                largest = max(largest, int(ids[start : start + (1 << 26)].max()))
    return largest
