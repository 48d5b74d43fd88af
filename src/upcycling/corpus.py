"""Corpus readers: the formats language-model corpora ship in, streamed as documents.

Public: ``resolve_sources(paths_or_globs, base_dir)`` (globs -> files), ``read_documents(source,
text_field)`` (one file's documents), ``documents(sources, ...)`` (the corpus with each document's
digest and split), ``estimated_text_bytes(source)`` and ``CorpusError``.

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
Files are read with bounded memory: text and JSON Lines in blocks, parquet a row group at a time in
batches, arrow a record batch at a time; only one document is ever held whole.

Split. A document is held out for validation iff a hash of (split_seed, its text) falls below
val_fraction: the split depends on nothing but the text, not on file names, formats, file order
or how the corpus is sharded, and exact duplicates always land on the same side.

Every problem raises CorpusError naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import zstandard

READ_BLOCK_BYTES = 1 << 20  # bytes read from disk at a time
ZSTD_INPUT_BYTES = 1 << 16  # compressed bytes decompressed at a time (bounds each output burst)
RECORD_BATCH_ROWS = 1024  # parquet rows decoded at a time
DOCUMENT_SPLIT_CHARS = 1 << 20  # a longer plain-text file becomes several documents
MAX_DOCUMENT_CHARS = 1 << 23  # a plain-text document without a blank line ends at a line break before this
# Uncompressed / compressed size of JSON Lines text, for size estimates only (zstd -3 and gzip -6
# on English web text give 3-4x; a smaller ratio errs towards more work).
COMPRESSION_RATIO_ESTIMATE = 3.0

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
UNSUPPORTED = {".bz2", ".xz", ".lz4", ".lzma", ".br", ".zip", ".tar", ".tgz", ".7z", ".rar"}
KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
READ_FIX = "remove it from corpus.paths"

# A blank line (possibly holding spaces) and the whitespace after it, up to the next text.
_NEW_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*(?=\S)")


class CorpusError(ValueError):
    """An input of the tokens stage (corpus file, split, tokenizer.json) that cannot work.

    The message names the file (and line or row) and the fix. Raised before any output is written."""


@dataclass(frozen=True)
class Source:
    path: Path  # the file to read
    label: str  # the path as the config names it (relative to base_dir if the pattern was)
    kind: str  # text | jsonl | parquet | arrow
    compression: str | None  # gzip | zstd | None
    size: int  # bytes on disk


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
        raise CorpusError(f"{path}: a compressed {kind} file cannot be read: decompress it (parquet "
                          f"and arrow compress inside the file)")  # fmt: skip
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
                Path(m)
                for m in sorted(glob.glob(full, recursive=True))
                if os.path.isfile(m) or _is_saved_dataset(m)
            ]
        elif os.path.isdir(full):
            if not _is_saved_dataset(full):
                _refuse_directory(pattern, full)
            matches = [Path(full)]
        else:
            matches = [Path(full)] if os.path.isfile(full) else []
        if not matches:
            raise CorpusError(
                f"corpus.paths: '{pattern}' matches no file (looked in {base}): fix the path or glob"
            )
        for match in matches:
            for file in _dataset_files(match) if match.is_dir() else [match]:
                label = file if os.path.isabs(pattern) else Path(os.path.relpath(file, base))
                files.setdefault(file, label.as_posix())
    return [Source(path, label, *source_format(path), path.stat().st_size) for path, label in files.items()]


def estimated_text_bytes(source: Source) -> int:
    """Bytes of text the file holds, cheaply: exact for plain files, the gzip size trailer, a
    zstd frame header that records it, or parquet's uncompressed size of the text column;
    otherwise the compressed size times COMPRESSION_RATIO_ESTIMATE."""
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
# Bytes: plain, gzip, zstd


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a zstd file, frame after frame; EOFError if the file ends inside a
    frame (zstandard's stream_reader would silently return the truncated data)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = None  # the decompression object of the frame being read
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            data = b""
            if self._frame is not None and self._frame.eof:
                data, self._frame = self._frame.unused_data, None
            data = data or self._file.read(ZSTD_INPUT_BYTES)
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            self._output = memoryview(self._frame.decompress(data))
        count = min(len(buffer), len(self._output))
        buffer[:count] = self._output[:count]
        self._output = self._output[count:]
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(source: Source):
    if source.compression == "gzip":
        return gzip.open(source.path, "rb")
    if source.compression == "zstd":
        return io.BufferedReader(_ZstdReader(source.path), buffer_size=1 << 16)
    return open(source.path, "rb")


_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


def _unreadable(source: Source, exc: BaseException) -> CorpusError:
    if source.compression == "gzip":
        check = f"'gzip -t {source.path}' checks it"
    elif source.compression == "zstd":
        check = f"'zstd -t {source.path}' checks it"
    else:
        return CorpusError(f"{source.path}: cannot read it ({exc}): fix its permissions or {READ_FIX}")
    return CorpusError(
        f"{source.path}: cannot read it as {source.compression} ({exc}): the file is corrupt or "
        f"truncated ({check}); re-create it or {READ_FIX}"
    )


def _invalid_utf8(source: Source, offset: int, line: int, exc: UnicodeDecodeError) -> CorpusError:
    where = "decompressed byte" if source.compression else "byte"
    return CorpusError(
        f"{source.path}: invalid UTF-8 at {where} {offset} (line {line}): {exc.reason}; re-encode the "
        f"file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or {READ_FIX}"
    )


# ----------------------------------------------------------------------------------------------
# Plain text


def _read_text_blocks(source: Source) -> Iterator[str]:
    """Yield the file's text in blocks, decoded strictly as UTF-8, line endings untouched."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes read before the current block
    newlines = 0  # newlines in them
    try:
        with _open_binary(source) as fh:
            while True:
                block = fh.read(READ_BLOCK_BYTES)
                held = decoder.getstate()[0]  # an unfinished character from the previous block
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    data = held + block
                    line = newlines + data.count(b"\n", 0, exc.start) + 1
                    raise _invalid_utf8(source, offset - len(held) + exc.start, line, exc) from None
                offset += len(block)
                newlines += block.count(b"\n")
                if text:
                    yield text
                if not block:
                    return
    except _READ_ERRORS as exc:
        raise _unreadable(source, exc) from exc


def safe_cut(text: str, limit: int, start: int = 0) -> int:
    """Where to end a piece of text that starts at start: the largest i <= limit with text[i] a
    newline (else a space) and text[i - 1] not whitespace. No byte-level pre-token spans such a
    point, so cutting there does not change the ids. limit if there is none (a hard cut)."""
    for separator in ("\n", " "):
        i = text.rfind(separator, start + 1, limit + 1)
        for _ in range(256):  # inside a run of whitespace: look a little further left, then give up
            if i <= start:
                break
            if not text[i - 1].isspace():
                return i
            i = text.rfind(separator, start + 1, i)
    return limit


def _document_end(text: str) -> int | None:
    """Where the plain-text document at the start of text ends, or None if more text is needed."""
    if len(text) <= DOCUMENT_SPLIT_CHARS:
        return None
    boundary = _NEW_PARAGRAPH.search(text, DOCUMENT_SPLIT_CHARS)
    if boundary is not None:
        return boundary.end()
    if len(text) < MAX_DOCUMENT_CHARS:
        return None
    newline = text.rfind("\n", DOCUMENT_SPLIT_CHARS, MAX_DOCUMENT_CHARS)
    return newline + 1 if newline >= 0 else safe_cut(text, MAX_DOCUMENT_CHARS, DOCUMENT_SPLIT_CHARS)


def _text_documents(source: Source, text_field: str) -> Iterator[str]:
    pending = ""  # text read, not yet yielded
    read_any = has_text = False
    for block in _read_text_blocks(source):
        read_any = True
        has_text = has_text or not block.isspace()
        pending += block
        while (end := _document_end(pending)) is not None:
            yield pending[:end]
            pending = pending[end:]
    if not has_text:
        what = "holds only whitespace" if read_any else "is empty"
        raise CorpusError(f"{source.path}: the file {what}: add text to it or {READ_FIX}")
    if pending:
        yield pending


# ----------------------------------------------------------------------------------------------
# JSON Lines


def _jsonl_documents(source: Source, text_field: str) -> Iterator[str]:
    offset = 0  # bytes before the current line
    try:
        with _open_binary(source) as fh:
            for line_number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _invalid_utf8(source, offset + exc.start, line_number, exc) from None
                offset += len(raw)
                if not line.strip():
                    continue
                where = f"{source.path}, line {line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(
                        f"{where}: not valid JSON ({exc.msg}, column {exc.colno}): each line of a "
                        f"JSON Lines file must be one JSON object; fix the line or the file's extension"
                    ) from None
                if not isinstance(record, dict):
                    raise CorpusError(
                        f"{where}: a JSON {type(record).__name__}, not an object: each line of a "
                        f"JSON Lines file must be one object holding the text in field '{text_field}'"
                    )
                if text_field not in record:
                    fields = ", ".join(f"'{k}'" for k in record) or "none"
                    raise CorpusError(
                        f"{where}: no field '{text_field}' (the line has fields: {fields}): set "
                        f"corpus.text_field to the field that holds the text"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise CorpusError(
                        f"{where}: field '{text_field}' is a JSON {type(text).__name__}, not a "
                        f"string: set corpus.text_field to the field that holds the text"
                    )
                if b"\\u" in raw:  # only an escape can smuggle in a lone surrogate
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as exc:
                        raise CorpusError(
                            f"{where}: field '{text_field}' holds an unpaired surrogate escape "
                            f"({exc.reason}): fix the line"
                        ) from None
                if text:
                    yield text
    except _READ_ERRORS as exc:
        raise _unreadable(source, exc) from exc


# ----------------------------------------------------------------------------------------------
# Parquet and Arrow (Hugging Face datasets)


def _check_text_column(source: Source, schema, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        columns = ", ".join(f"'{name}'" for name in schema.names) or "none"
        raise CorpusError(
            f"{source.path}: no column '{text_field}' (the file has columns: {columns}): set "
            f"corpus.text_field to the column that holds the text"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or kind == pa.string_view()):
        raise CorpusError(
            f"{source.path}: column '{text_field}' holds {kind}, not strings: set corpus.text_field "
            f"to the column that holds the text"
        )


def _column_texts(source: Source, column, name: str, first_row: int) -> Iterator[str]:
    """The non-empty strings of one batch's text column; CorpusError naming the row of bad UTF-8."""
    import pyarrow as pa

    try:
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        row = first_row
        for row, value in enumerate(column.cast(pa.binary()).to_pylist(), first_row):
            try:
                if value is not None:
                    value.decode("utf-8")
            except UnicodeDecodeError:
                break
        raise CorpusError(
            f"{source.path}, row {row} (counting from 0): invalid UTF-8 in column '{name}' "
            f"({exc}): re-create the file with valid text or {READ_FIX}"
        ) from None
    for text in column.to_pylist():
        if text:
            yield text


def _parquet_documents(source: Source, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"{source.path}: not a readable parquet file ({exc}): re-create it or {READ_FIX}"
        ) from None
    with parquet:
        _check_text_column(source, parquet.schema_arrow, text_field)
        row = 0
        for group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(RECORD_BATCH_ROWS, row_groups=[group], columns=[text_field])
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as exc:
                    raise CorpusError(
                        f"{source.path}, row group {group} (rows from {row}, counting from 0): cannot "
                        f"read it ({exc}): the file is corrupt or truncated; re-create it or {READ_FIX}"
                    ) from None
                yield from _column_texts(source, batch.column(0), text_field, row)
                row += batch.num_rows


def _arrow_documents(source: Source, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    def unreadable(exc, row):
        where = f", rows from {row} (counting from 0)" if row else ""
        return CorpusError(
            f"{source.path}{where}: not a readable Arrow IPC file ({exc}): re-save the dataset or {READ_FIX}"
        )

    with pa.OSFile(str(source.path)) as fh:
        try:
            reader = pa.ipc.open_stream(fh)  # datasets' save_to_disk writes the stream format
            batches = iter(reader)
        except (pa.ArrowException, OSError):
            try:
                fh.seek(0)
                reader = pa.ipc.open_file(fh)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except (pa.ArrowException, OSError) as exc:
                raise unreadable(exc, 0) from None
        _check_text_column(source, reader.schema, text_field)
        row = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:
                raise unreadable(exc, row) from None
            yield from _column_texts(source, batch.column(text_field), text_field, row)
            row += batch.num_rows


# ----------------------------------------------------------------------------------------------
# Documents and the split

_READERS = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents,
            "arrow": _arrow_documents}  # fmt: skip


def read_documents(source: Source, text_field: str = "text") -> Iterator[str]:
    """The file's documents (non-empty strings), in order. CorpusError if it holds none."""
    count = 0
    for text in _READERS[source.kind](source, text_field):
        count += 1
        yield text
    if count == 0:
        if source.kind == "jsonl":
            what = f"without a document: no line has text in field '{text_field}'"
        else:
            what = f"without a document: no row has text in column '{text_field}'"
        raise CorpusError(f"{source.path}: the file is {what}: add documents or {READ_FIX}")


def is_held_out(text_sha256: bytes, split_seed: int, val_fraction: float) -> bool:
    """The validation split: a hash of (seed, text) below val_fraction."""
    key = hashlib.sha256(f"split {split_seed}:".encode() + text_sha256).digest()
    return int.from_bytes(key[:8], "big") / 2**64 < val_fraction


def documents(sources: list[Source], text_field: str, val_fraction: float, split_seed: int) -> Iterator[Document]:
    """Every document of the sources in order, with its text's sha256 and its split."""
    for index, source in enumerate(sources):
        for text in read_documents(source, text_field):
            data = text.encode("utf-8")
            digest = hashlib.sha256(data).digest()
            yield Document(index, text, digest, len(data), is_held_out(digest, split_seed, val_fraction))
