"""Tokens stage: corpus files -> byte-level BPE tokenizer -> token shards -> meta.json.

Three steps, each a Snakemake rule (workflow/rules/tokenize.smk) and a CLI command:
1. ``make_tokenizer``: train the tokenizer once on a sample of the corpus, or copy a given
   tokenizer.json (any Hugging Face tokenizer with an end-of-text token, e.g. an existing LLM's);
2. ``tokenize_shard``, one job per shard (a contiguous run of whole corpus files, see
   ``tokens.shard_plan``): scan the shard's files (read, decode, parse, hash; a bad file raises
   CorpusError here, naming the file and the line or row, before anything is written), then
   encode both splits batch by batch into train.bin / val.bin plus a shard.json sidecar;
3. ``gather_shards``: check the shards against each other and the plan, write meta.json with the
   totals and the shard list that training reads as one stream.
``tokenize_corpus`` runs all three in one process (``upcycling tokenize``). Every step writes under
a temporary name and renames into place, so a failure leaves no partial output.

The tokenizer, its sample and how documents are cut into pieces: ``upcycling.data.tokenizer``. Memory
stays bounded: documents stream through in pieces and batches of about BATCH_CHARS characters,
at most two batches in flight, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from upcycling.core.errors import storage_error
from upcycling.core.publish import publish_json, sha256_file, staging_dir
from upcycling.data import tokens as layout
from upcycling.data.corpus import CorpusError, CorpusOptions, Document, Source, check_unchanged, resolve_sources
from upcycling.data.tokenizer import (
    EOT_TOKEN,
    end_of_text_id,
    exact_cuts,
    load_tokenizer,
    make_tokenizer,
    piece_ends,
    train_tokenizer,
    vocab_request,
)
from upcycling.data.tokens import FORMAT_VERSION, TokenFilesError, load_tokens, token_dtype

__all__ = [
    "CorpusError",
    "CorpusOptions",
    "TokenFilesError",
    "gather_shards",
    "load_tokens",
    "load_tokenizer",
    "make_tokenizer",
    "resolve_sources",
    "tokenize_corpus",
    "tokenize_shard",
    "train_tokenizer",
]
logger = logging.getLogger(__name__)

BATCH_CHARS = 1 << 21  # characters per encode_batch call: 32+ pieces for the cores, ~170 MB peak RSS
LOG_EVERY_S = 10.0


# ----------------------------------------------------------------------------------------------
# Batches and encoding


def iter_batches(
    docs: Iterable[Document],
    piece_chars: int | None = None,
) -> Iterator[tuple[str, list[str], list[bool]]]:
    """What the stage hands to encode_batch: (split, texts, ends_document), the pieces of each
    split (at most piece_chars long, default PIECE_CHARS; 0: whole documents) grouped into
    batches of about BATCH_CHARS characters, in corpus order."""
    texts: dict[str, list[str]] = {"train": [], "val": []}
    ends: dict[str, list[bool]] = {"train": [], "val": []}  # the piece ends its document
    chars = {"train": 0, "val": 0}
    for document in docs:
        split = "val" if document.held_out else "train"
        start = 0
        for end in piece_ends(document.text, piece_chars):
            texts[split].append(document.text[start:end])
            ends[split].append(end == len(document.text))
            start = end
        chars[split] += len(document.text)
        if chars[split] >= BATCH_CHARS:
            yield split, texts[split], ends[split]
            texts[split], ends[split], chars[split] = [], [], 0
    for split in ("train", "val"):
        if texts[split]:
            yield split, texts[split], ends[split]


def encode_batch_ids(tokenizer: Tokenizer, texts: list[str], ends: list[bool], eot_id: int, dtype) -> np.ndarray:
    """Ids of a batch of pieces, end-of-text after each piece that ends a document, as one array."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    encodings = encode(texts, add_special_tokens=False)
    eot = (eot_id,)
    parts = []
    total = 0
    for encoding, ends_document in zip(encodings, ends):
        ids = encoding.ids
        parts.append(ids)
        total += len(ids)
        if ends_document:
            parts.append(eot)
            total += 1
    return np.fromiter(itertools.chain.from_iterable(parts), dtype=dtype, count=total)


def _encode_pipelined(tokenizer: Tokenizer, batches, eot_id: int, dtype) -> Iterator[tuple[str, np.ndarray, int, int]]:
    """(split, ids, documents, characters) per batch, in order. A worker thread encodes (the
    tokenizer releases the GIL) while this one reads the next batch and writes the previous, so
    reading and writing hide behind encoding instead of leaving the cores idle."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
        in_flight: deque = deque()
        try:
            for split, texts, ends in batches:
                future = encoder.submit(encode_batch_ids, tokenizer, texts, ends, eot_id, dtype)
                in_flight.append((split, future, sum(ends), sum(map(len, texts))))
                if len(in_flight) > 1:  # at most two batches in memory
                    split, future, document_count, chars = in_flight.popleft()
                    yield split, future.result(), document_count, chars
            while in_flight:
                split, future, document_count, chars = in_flight.popleft()
                yield split, future.result(), document_count, chars
        finally:
            for _, future, _, _ in in_flight:
                future.cancel()


class _Progress:
    """Logs documents, tokens, MB/s and ETA every LOG_EVERY_S seconds."""

    def __init__(self, name: str, total_documents: int, total_chars: int, bytes_per_char: float):
        self.name, self.total_documents, self.total_chars = name, total_documents, total_chars
        self.bytes_per_char = bytes_per_char  # counting characters is free, counting bytes is not
        self.documents = self.tokens = self.chars = 0
        self.start = self.last_log = time.perf_counter()

    def update(self, documents: int, tokens: int, chars: int, force: bool = False) -> None:
        self.documents += documents
        self.tokens += tokens
        self.chars += chars
        now = time.perf_counter()
        if not force and now - self.last_log < LOG_EVERY_S:
            return
        self.last_log = now
        elapsed = max(now - self.start, 1e-9)
        done = self.chars / max(self.total_chars, 1)
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        logger.info(
            "%s: %d/%d documents, %d tokens, %.2f MB/s, %.0f tokens/s, %.0f%% done, ETA %.0f s",
            self.name,
            self.documents,
            self.total_documents,
            self.tokens,
            self.chars * self.bytes_per_char / elapsed / 1e6,
            self.tokens / elapsed,
            100 * done,
            eta,
        )


# ----------------------------------------------------------------------------------------------
# One shard


def _refuse_empty_split(train_documents: int, val_documents: int, files: int, options: CorpusOptions) -> None:
    for side, count in (("training", train_documents), ("validation", val_documents)):
        if count == 0:
            raise CorpusError(
                f"the {side} split is empty ({train_documents + val_documents} documents in {files} files, "
                f"corpus.val_fraction={options.val_fraction}, corpus.split_seed={options.split_seed}): "
                f"{'raise' if side == 'validation' else 'lower'} corpus.val_fraction or add documents"
            )


def scan_files(sources: list[Source], options: CorpusOptions) -> list[dict]:
    """Read every file once (decode, parse, hash, count): a bad file raises CorpusError here, cheaply.

    Per file: its label, the sha256 of its documents' texts, its documents per split, chars, bytes."""
    hashers = [hashlib.sha256() for _ in sources]  # of each file's documents' texts
    tallies = [dict.fromkeys(("train_documents", "val_documents", "chars", "bytes"), 0) for _ in sources]
    last_log = time.perf_counter()
    for document in options.documents(sources):
        tally = tallies[document.source]
        if time.perf_counter() - last_log > LOG_EVERY_S:  # a shard's scan takes a minute or more
            last_log = time.perf_counter()
            logger.info(
                "scan: file %d/%d, %.0f MB of text so far",
                document.source + 1,
                len(tallies),
                sum(t["bytes"] for t in tallies) / 1e6,
            )
        hashers[document.source].update(document.sha256)
        tally["val_documents" if document.held_out else "train_documents"] += 1
        tally["chars"] += len(document.text)
        tally["bytes"] += document.size
    return [
        {"source": source.label, "sha256": hasher.hexdigest(), **tally}
        for source, hasher, tally in zip(sources, hashers, tallies, strict=True)
    ]


def tokenize_shard(
    sources: list[Source],
    options: CorpusOptions,
    tokenizer_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    index: int = 0,
    count: int = 1,
    eot_token: str = EOT_TOKEN,
) -> dict:
    """Write out_dir/{train.bin, val.bin, shard.json} for these files; return the sidecar."""
    out_dir, name = Path(out_dir), layout.shard_name(index, count)
    tokenizer = load_tokenizer(tokenizer_file, eot_token)
    started = time.perf_counter()
    files = scan_files(sources, options)
    train_documents, val_documents = (sum(f[f"{s}_documents"] for f in files) for s in ("train", "val"))
    chars, text_bytes = sum(f["chars"] for f in files), sum(f["bytes"] for f in files)
    logger.info(
        "shard %s: %d files, %d training and %d validation documents, %.1f MB of text (scanned in %.1f s)",
        name,
        len(files),
        train_documents,
        val_documents,
        text_bytes / 1e6,
        time.perf_counter() - started,
    )
    if count == 1:  # the shard is the corpus: an empty split is known before encoding
        _refuse_empty_split(train_documents, val_documents, len(files), options)

    vocab_size, eot_id = tokenizer.get_vocab_size(), end_of_text_id(tokenizer, eot_token, tokenizer_file)
    piece_chars = None if exact_cuts(tokenizer) else 0  # 0: whole documents, so the ids stay exact
    dtype = token_dtype(vocab_size)
    # A literal "<|endoftext|>" in the corpus is text, not a document boundary.
    if hasattr(tokenizer, "encode_special_tokens"):
        tokenizer.encode_special_tokens = True
    counts = {"train": [0, 0], "val": [0, 0]}  # split -> [tokens, documents]
    max_id = -1  # the largest id written: load_tokens checks it against vocab_size without a pass over the ids
    try:
        with staging_dir(out_dir) as tmp_dir:
            progress = _Progress(f"shard {name}", train_documents + val_documents, chars, text_bytes / max(chars, 1))
            with open(tmp_dir / "train.bin", "wb") as train_file, open(tmp_dir / "val.bin", "wb") as val_file:
                outputs = {"train": train_file, "val": val_file}
                batches = iter_batches(options.documents(sources), piece_chars)
                for split, ids, document_count, batch_chars in _encode_pipelined(tokenizer, batches, eot_id, dtype):
                    ids.tofile(outputs[split])
                    counts[split][0] += len(ids)
                    counts[split][1] += document_count
                    max_id = max(max_id, int(ids.max())) if len(ids) else max_id
                    progress.update(document_count, len(ids), batch_chars)
            progress.update(0, 0, 0, force=True)
            check_unchanged(sources, [source.size for source in sources], "while it was tokenized")
            sidecar = _sidecar(name, index, count, vocab_size, dtype, eot_id, tokenizer_file, counts, text_bytes)
            sidecar.update({"max_token_id": max_id, **options.as_dict(), "files": _file_entries(files)})
            (tmp_dir / "shard.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    except OSError as exc:  # staging_dir has removed the partial shard
        needed = int(text_bytes / layout.BYTES_PER_TOKEN * dtype.itemsize)  # about: the corpus's bytes per token vary
        error = storage_error(exc, out_dir.parent, needed=needed, what=f"shard {name}")
        if error is None:
            raise
        raise error from None
    return sidecar


def _file_entries(files: list[dict]) -> list[dict]:
    return [{k: f[k] for k in ("source", "sha256", "train_documents", "val_documents")} for f in files]


def _sidecar(name, index, count, vocab_size, dtype, eot_id, tokenizer_file, counts, text_bytes) -> dict:
    """A shard's shard.json, but for its files, corpus options and largest id."""
    return {
        "format_version": FORMAT_VERSION,
        "shard": name,
        "index": index,
        "count": count,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eot_id": eot_id,
        "tokenizer_sha256": sha256_file(Path(tokenizer_file)),
        "train_tokens": counts["train"][0],
        "val_tokens": counts["val"][0],
        "train_documents": counts["train"][1],
        "val_documents": counts["val"][1],
        "text_bytes": text_bytes,
    }


# ----------------------------------------------------------------------------------------------
# Gather


def gather_shards(
    tokens_dir: str | os.PathLike,
    plan: list[list[str]],
    options: CorpusOptions,
    tokenizer_file: str | os.PathLike | None = None,
) -> dict:
    """Check the shards (one per entry of plan: its files' labels) and write tokens_dir/meta.json.

    ``tokenizer_file``: the tokenizer that made the shards (default: tokens_dir/tokenizer.json; a
    second corpus tokenized with the first corpus's tokenizer names that one). meta.json records
    its path relative to tokens_dir."""
    tokens_dir = Path(tokens_dir)
    count, rerun = len(plan), "rerun its tokenize_shard job (snakemake --forcerun tokenize_shard)"
    tokenizer_file = Path(tokenizer_file) if tokenizer_file else layout.tokenizer_path(tokens_dir)
    if not tokenizer_file.is_file():
        raise TokenFilesError(f"{tokenizer_file} does not exist: run the train_tokenizer job first")
    tokenizer_sha256 = sha256_file(tokenizer_file)
    expected = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "count": count,
        **options.as_dict(),
    }
    sidecars: list[dict[str, Any]] = []  # each shard.json, as read
    for index, labels in enumerate(plan):
        directory = layout.shard_dir(tokens_dir, index, count)
        path = directory / "shard.json"
        try:
            sidecar = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TokenFilesError(f"{path}: cannot read it ({exc}): {rerun}") from None
        differs = [key for key, value in expected.items() if sidecar.get(key) != value]
        if sidecars and sidecar.get("eot_id") != sidecars[0]["eot_id"]:
            differs.append("eot_id (tokenizer.eot_token changed)")
        if [f["source"] for f in sidecar.get("files", [])] != labels:
            differs.append("files (the corpus changed since it was tokenized)")
        itemsize = np.dtype(sidecar.get("dtype", "uint8")).itemsize
        for split in ("train", "val"):
            file = directory / f"{split}.bin"
            if not file.is_file() or file.stat().st_size != sidecar.get(f"{split}_tokens", -1) * itemsize:
                differs.append(f"{split}.bin size")
        if differs:
            raise TokenFilesError(f"{directory} does not match this tokens stage ({', '.join(differs)}): {rerun}")
        sidecars.append(sidecar)

    totals = {
        key: sum(s[key] for s in sidecars) for key in ("train_tokens", "val_tokens", "train_documents", "val_documents")
    }
    _refuse_empty_split(totals["train_documents"], totals["val_documents"], sum(map(len, plan)), options)
    files = [file for sidecar in sidecars for file in sidecar["files"]]
    first = sidecars[0]
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": first["vocab_size"],
        "dtype": first["dtype"],
        "eot_id": first["eot_id"],
        **totals,
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer": os.path.relpath(tokenizer_file, tokens_dir),
        # The texts' hash, file by file: independent of compression, file format and shard count.
        "corpus_sha256": hashlib.sha256("".join(f"{f['sha256']}\n" for f in files).encode()).hexdigest(),
        "sources": [f["source"] for f in files],
        **options.as_dict(),
        "shards": [
            {
                "path": f"{layout.SHARDS_DIR}/{s['shard']}",
                "train_tokens": s["train_tokens"],
                "val_tokens": s["val_tokens"],
                **({"max_token_id": s["max_token_id"]} if "max_token_id" in s else {}),
            }
            for s in sidecars
        ],
        **vocab_request(tokenizer_file, tokenizer_sha256, first["vocab_size"]),
    }
    publish_json(layout.meta_path(tokens_dir), meta, indent=2)
    logger.info(
        "tokens: %d training and %d validation tokens (%s) in %d shards, %s",
        meta["train_tokens"],
        meta["val_tokens"],
        meta["dtype"],
        count,
        tokens_dir,
    )
    return meta


# ----------------------------------------------------------------------------------------------
# The whole stage in one process


def shard_sources(sources: list[Source], shards: int) -> list[list[Source]]:
    """The sources of each shard (tokens.shard_plan by bytes on disk); CorpusError if shards > files."""
    try:
        plan = layout.shard_plan([source.size for source in sources], shards)
    except ValueError as exc:
        raise CorpusError(f"corpus.shards={shards}: {exc} (each shard is whole files)") from None
    return [[sources[i] for i in files] for files in plan]


def tokenize_corpus(
    corpus_cfg: dict, tokenizer_cfg: dict, out_dir: str | os.PathLike, *, base_dir: str | os.PathLike | None = None
) -> dict:
    """Write out_dir/{tokenizer.json, shards/*/..., meta.json}; return the meta.

    corpus_cfg: paths, text_field, val_fraction, split_seed, shards. tokenizer_cfg: vocab_size,
    path (a tokenizer.json to use as is, or None to train one), min_frequency, sample_bytes.
    Relative paths start at base_dir (default: the working directory). Nothing is published
    unless every step succeeds."""
    out_dir = Path(out_dir)
    options = CorpusOptions.from_config(corpus_cfg)
    sources = resolve_sources(corpus_cfg["paths"], base_dir)
    groups = shard_sources(sources, int(corpus_cfg.get("shards", 1)))
    created = [p for p in out_dir.parents if not p.exists()]  # directories a failure must not leave
    try:
        with staging_dir(out_dir) as tmp_dir:
            make_tokenizer(sources, options, tokenizer_cfg, layout.tokenizer_path(tmp_dir), base_dir)
            for index, group in enumerate(groups):
                tokenize_shard(
                    group,
                    options,
                    layout.tokenizer_path(tmp_dir),
                    layout.shard_dir(tmp_dir, index, len(groups)),
                    index,
                    len(groups),
                    tokenizer_cfg.get("eot_token", EOT_TOKEN),
                )
            meta = gather_shards(tmp_dir, [[s.label for s in group] for group in groups], options)
    except BaseException:
        for directory in created:  # innermost first; only if still empty
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    return meta
