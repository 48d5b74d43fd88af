"""The corpus: which files to read, what format each is, their documents and the split.

Public: ``resolve_sources(paths_or_globs, base_dir)`` (globs -> files), ``read_documents(source,
text_field)`` (one file's documents, from ``upcycling.data.readers``), ``documents(sources, ...)`` (the
corpus with each document's digest and split), ``CorpusOptions`` (the config that decides them),
``estimated_text_bytes(source)`` and ``CorpusError``.

Formats, from the file name (a compression suffix first: .gz, or .zst / .zstd):
- .jsonl, .json, .ndjson: JSON Lines, one document per line in the field ``text_field`` (blank
  lines and empty texts are skipped). C4's .json.gz and SlimPajama's .jsonl.zst are such files.
- .parquet: one document per row of the string column ``text_field`` (nulls and "" skipped).
- .arrow: Arrow IPC (stream or file format), one document per row of that column. A directory
  holding ``state.json`` is a Hugging Face dataset written by ``save_to_disk``: its arrow files,
  in the order state.json lists them. A DatasetDict's directory is refused: name one split.
- anything else: plain UTF-8 text, one document per file; a file longer than
  DOCUMENT_SPLIT_CHARS becomes several documents, each ending at the first blank line past that
  length (or, without one, at the last line break before MAX_DOCUMENT_CHARS).
``select`` ({field: value or list of values}, corpus.select) keeps only the records whose fields
hold an accepted value: a dotted JSON path, or a parquet/arrow column (a dot goes into a struct),
e.g. {"meta.redpajama_set_name": "RedPajamaCommonCrawl"} for SlimPajama's CommonCrawl part.
Files are read with bounded memory: text and JSON Lines in blocks, parquet a row group at a time in
batches, arrow a record batch at a time; only one document is ever held whole.

Split. A document is held out for validation iff a hash of (split_seed, its text) falls below
val_fraction: the split depends on nothing but the text, not on file names, formats, file order
or how the corpus is sharded, and exact duplicates always land on the same side.

Every problem raises CorpusError naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import zstandard

from upcycling.data.readers import READ_FIX, CorpusError, Source, read_documents, safe_cut

__all__ = [
    "CorpusError",
    "CorpusOptions",
    "Document",
    "Source",
    "documents",
    "estimated_text_bytes",
    "is_held_out",
    "read_documents",
    "resolve_sources",
    "safe_cut",
    "source_format",
]

# Uncompressed / compressed size of JSON Lines text, for size estimates only (zstd -3 and gzip -6
# on English web text give 3-4x; a smaller ratio errs towards more work).
COMPRESSION_RATIO_ESTIMATE = 3.0

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
UNSUPPORTED = {".bz2", ".xz", ".lz4", ".lzma", ".br", ".zip", ".tar", ".tgz", ".7z", ".rar"}
KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}


class Document(NamedTuple):
    source: int  # index of its file in the sources
    text: str
    sha256: bytes  # of the UTF-8 text
    size: int  # bytes of the UTF-8 text
    held_out: bool  # in the validation split


# ----------------------------------------------------------------------------------------------
# Finding the files


def source_format(path: Path) -> tuple[str, str | None]:
    """(kind, compression) of a file from its name; CorpusError for a format this cannot read."""
    stem, ext = os.path.splitext(path.name.lower())
    compression = COMPRESSIONS.get(ext)
    if compression:
        stem, ext = os.path.splitext(stem)
    elif ext in UNSUPPORTED:
        raise CorpusError(
            f"{path}: '{ext}' files cannot be read: decompress it, or recompress it as .zst "
            f"(zstd) or .gz, or {READ_FIX}"
        )
    kind = KINDS.get(ext, "text")
    if compression and kind in ("parquet", "arrow"):
        raise CorpusError(
            f"{path}: a compressed {kind} file cannot be read: decompress it (parquet "
            f"and arrow compress inside the file)"
        )
    return kind, compression


def _is_saved_dataset(path: str | Path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def _dataset_files(directory: Path) -> list[Path]:
    """The arrow files of a dataset saved by ``datasets``' save_to_disk, in their order."""
    state_path = directory / "state.json"
    fix = "re-save the dataset with save_to_disk, or name its .arrow files in corpus.paths"
    try:
        state = json.loads(state_path.read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorpusError(f"{state_path}: not a datasets state.json ({exc!r}): {fix}") from None
    if not names:
        raise CorpusError(f"{state_path}: the dataset lists no data files: {fix}")
    files = [directory / name for name in names]
    for file in files:
        if not file.is_file():
            raise CorpusError(f"{state_path} lists {file.name}, which does not exist: {fix}")
    return files


def _refuse_directory(pattern: str, full: str) -> None:
    dataset_dict = os.path.join(full, "dataset_dict.json")
    if os.path.isfile(dataset_dict):
        try:
            splits = ", ".join(json.loads(Path(dataset_dict).read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            splits = "?"
        raise CorpusError(
            f"corpus.paths: '{pattern}' is a Hugging Face DatasetDict (splits: {splits}): name one "
            f"split's directory, e.g. '{pattern.rstrip('/')}/train' (the stage makes its own split)"
        )
    raise CorpusError(
        f"corpus.paths: '{pattern}' is a directory: name its files, e.g. '{pattern.rstrip('/')}/*.jsonl.zst'"
    )


def resolve_sources(paths_or_globs, base_dir: str | os.PathLike | None = None) -> list[Source]:
    """Expand paths and globs (one or a list) into sources: each glob's matches sorted, the
    patterns in the order given, a file matched twice read once. A saved dataset's directory
    stands for its arrow files. Relative patterns start at base_dir (default: the working directory)."""
    if isinstance(paths_or_globs, (str, os.PathLike)):
        paths_or_globs = [paths_or_globs]
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    files: dict[Path, str] = {}  # file -> label, in order
    for pattern in map(str, paths_or_globs):
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        if glob.has_magic(full):
            matches = [
                Path(m) for m in sorted(glob.glob(full, recursive=True)) if os.path.isfile(m) or _is_saved_dataset(m)
            ]
        elif os.path.isdir(full):
            if not _is_saved_dataset(full):
                _refuse_directory(pattern, full)
            matches = [Path(full)]
        else:
            matches = [Path(full)] if os.path.isfile(full) else []
        if not matches:
            raise CorpusError(f"corpus.paths: '{pattern}' matches no file (looked in {base}): fix the path or glob")
        for match in matches:
            for file in _dataset_files(match) if match.is_dir() else [match]:
                label = file if os.path.isabs(pattern) else Path(os.path.relpath(file, base))
                files.setdefault(file, label.as_posix())
    return [Source(path, label, *source_format(path), path.stat().st_size) for path, label in files.items()]


def check_unchanged(sources: list[Source], sizes: list[int] | None, when: str = "since the jobs were planned") -> None:
    """CorpusError naming a corpus file whose size on disk is not ``sizes`` (what the plan recorded,
    or what the file had when the job began): tokens must come from the files the plan split."""
    if sizes is None:
        return
    if len(sizes) != len(sources):
        raise CorpusError(
            f"the corpus changed {when}: {len(sources)} files now, {len(sizes)} planned: rerun snakemake "
            "(it plans the tokens stage again from the files as they are)"
        )
    for source, planned in zip(sources, sizes):
        try:
            now = source.path.stat().st_size
        except FileNotFoundError:
            now = None
        if now != planned:
            found = "is gone" if now is None else f"has {now} bytes now, {planned} bytes then"
            raise CorpusError(
                f"corpus file {source.label} changed {when}: it {found}; "
                "put the file back as it was, or rerun snakemake, which plans the tokens stage again from the "
                "files as they are (a file still being written or synced must be complete first)"
            )


def estimated_text_bytes(source: Source) -> int:
    """Bytes of text the file holds, cheaply: exact for plain files, the gzip size trailer, a
    zstd frame header that records it, or parquet's uncompressed size of its columns (the text
    dominates); otherwise the compressed size times COMPRESSION_RATIO_ESTIMATE."""
    guess = int(source.size * COMPRESSION_RATIO_ESTIMATE)
    try:
        if source.compression == "gzip" and source.size >= 18:
            with open(source.path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", fh.read(4))[0]  # size mod 2^32
            return isize if isize >= source.size else guess
        if source.compression == "zstd":
            with open(source.path, "rb") as fh:
                content_size = zstandard.frame_content_size(fh.read(18))
            # Only the first frame's size is recorded: trusted if it can be the whole file's.
            return content_size if content_size >= source.size else guess
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            metadata = pq.ParquetFile(source.path).metadata
            return sum(
                group.column(column).total_uncompressed_size
                for group in (metadata.row_group(i) for i in range(metadata.num_row_groups))
                for column in range(group.num_columns)
            )
    except Exception:  # an estimate: a file this cannot inspect is reported when it is read
        return guess
    return source.size


# ----------------------------------------------------------------------------------------------
# Documents and the split


def is_held_out(text_sha256: bytes, split_seed: int, val_fraction: float) -> bool:
    """The validation split: a hash of (seed, text) below val_fraction."""
    key = hashlib.sha256(f"split {split_seed}:".encode() + text_sha256).digest()
    return int.from_bytes(key[:8], "big") / 2**64 < val_fraction


def documents(
    sources: list[Source], text_field: str, val_fraction: float, split_seed: int, select: dict | None = None
) -> Generator[Document, None, None]:
    """Every document of the sources in order, with its text's sha256 and its split."""
    for index, source in enumerate(sources):
        for text in read_documents(source, text_field, select):
            data = text.encode("utf-8")
            digest = hashlib.sha256(data).digest()
            yield Document(index, text, digest, len(data), is_held_out(digest, split_seed, val_fraction))


@dataclass(frozen=True)
class CorpusOptions:
    """What decides the documents and their split: corpus.text_field, val_fraction, split_seed, select."""

    text_field: str = "text"
    val_fraction: float = 0.1
    split_seed: int = 0
    select: dict = field(default_factory=dict)  # {field: [accepted values]}

    @classmethod
    def from_config(cls, corpus_cfg: dict) -> CorpusOptions:
        select = {
            path: list(v) if isinstance(v, (list, tuple)) else [v]
            for path, v in (corpus_cfg.get("select") or {}).items()
        }
        options = cls(
            corpus_cfg.get("text_field", "text"),
            float(corpus_cfg.get("val_fraction", 0.1)),
            int(corpus_cfg.get("split_seed", 0)),
            select,
        )
        if not 0 < options.val_fraction < 1:
            raise CorpusError(f"corpus.val_fraction={options.val_fraction}: it must lie strictly between 0 and 1")
        return options

    def documents(self, sources: list[Source]) -> Generator[Document, None, None]:
        return documents(sources, self.text_field, self.val_fraction, self.split_seed, self.select)

    def as_dict(self) -> dict:
        return {
            "text_field": self.text_field,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "select": self.select,
        }
