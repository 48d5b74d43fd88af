"""Corpus file readers: the bytes of plain, gzip and zstd files, and the documents of each format.

Which files to read and what each is come first (``upcycling.data.corpus``); this module turns one
file into its documents with bounded memory: text and JSON Lines in blocks, parquet a row group
at a time in batches, arrow a record batch at a time; only one document is held whole.
Every problem raises CorpusError naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from upcycling.core.errors import InputError
from upcycling.data.streams import open_binary

READ_BLOCK_BYTES = 1 << 20  # bytes read from disk at a time
RECORD_BATCH_ROWS = 1024  # parquet rows decoded at a time
DOCUMENT_SPLIT_CHARS = 1 << 20  # a longer plain-text file becomes several documents
MAX_DOCUMENT_CHARS = 1 << 23  # a plain-text document without a blank line ends at a line break before this
READ_FIX = "remove it from corpus.paths"

# A blank line (possibly holding spaces) and the whitespace after it, up to the next text.
_NEW_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*(?=\S)")


class CorpusError(InputError):
    """An input of the tokens stage (corpus file, split, tokenizer.json) that cannot work.

    The message names the file (and line or row) and the fix. Raised before any output is written."""


@dataclass(frozen=True)
class Source:
    path: Path  # the file to read
    label: str  # the path as the config names it (relative to base_dir if the pattern was)
    kind: str  # text | jsonl | parquet | arrow
    compression: str | None  # gzip | zstd | None
    size: int  # bytes on disk


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


# -------------------------------------------------------------------------------------- plain text


def _read_text_blocks(source: Source) -> Iterator[str]:
    """Yield the file's text in blocks, decoded strictly as UTF-8, line endings untouched."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes read before the current block
    newlines = 0  # newlines in them
    try:
        with open_binary(source.path, source.compression) as fh:
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


def _text_documents(source: Source, text_field: str, select: dict | None) -> Iterator[str]:
    if select:
        raise CorpusError(
            f"{source.path}: plain text has no fields for corpus.select to match: give JSON Lines, "
            f"parquet or arrow files, or drop corpus.select"
        )
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


# -------------------------------------------------------------------------------------- json lines


def _field(record: dict, path: str):
    """record's value at a dotted path ('meta.redpajama_set_name'); KeyError if there is none."""
    value = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(path)
        value = value[key]
    return value


def _record_selected(record: dict, select: dict, where: str) -> bool:
    for path, allowed in select.items():
        try:
            value = _field(record, path)
        except KeyError:
            raise CorpusError(
                f"{where}: no field '{path}' for corpus.select: fix the field in corpus.select (a dot "
                f"goes into a nested object)"
            ) from None
        if value not in allowed:
            return False
    return True


def _jsonl_documents(source: Source, text_field: str, select: dict | None) -> Iterator[str]:
    offset = 0  # bytes before the current line
    try:
        with open_binary(source.path, source.compression) as fh:
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
                if text and (not select or _record_selected(record, select, where)):
                    yield text
    except _READ_ERRORS as exc:
        raise _unreadable(source, exc) from exc


# ------------------------------------------------------- parquet and arrow (hugging face datasets)


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


def _selected_rows(source: Source, batch, select: dict | None) -> list[bool] | None:
    """Which rows of a record batch corpus.select keeps (None: all)."""
    if not select:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc

    masks = []  # one per corpus.select entry: the rows whose value it allows
    for path, allowed in select.items():
        head, *rest = path.split(".")
        column = batch.column(head) if head in batch.schema.names else None
        for key in rest:
            if column is None or not pa.types.is_struct(column.type) or column.type.get_field_index(key) < 0:
                column = None
                break
            column = column.field(key)
        if column is None:
            raise CorpusError(
                f"{source.path}: no column '{path}' for corpus.select (the file has columns: "
                f"{', '.join(batch.schema.names)}): fix the column in corpus.select (a dot goes into a struct)"
            )
        try:
            hits = pc.fill_null(pc.is_in(column, value_set=pa.array(list(allowed), type=column.type)), False)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise CorpusError(
                f"{source.path}: corpus.select's values for '{path}' do not fit its type {column.type} "
                f"({exc}): give values of that type"
            ) from None
        masks.append(hits)
    return functools.reduce(pc.and_, masks).to_pylist()


def _column_texts(source: Source, column, name: str, first_row: int, keep=None) -> Iterator[str]:
    """The non-empty strings of one batch's text column; CorpusError naming the row of bad UTF-8."""
    import pyarrow as pa

    try:
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        row = first_row
        for row, value in enumerate(column.cast(pa.binary()).to_pylist(), first_row):  # noqa: B007 (named below)
            try:
                if value is not None:
                    value.decode("utf-8")
            except UnicodeDecodeError:
                break
        raise CorpusError(
            f"{source.path}, row {row} (counting from 0): invalid UTF-8 in column '{name}' "
            f"({exc}): re-create the file with valid text or {READ_FIX}"
        ) from None
    texts = column.to_pylist()
    for index, text in enumerate(texts):
        if text and (keep is None or keep[index]):
            yield text


def _columns(text_field: str, select: dict | None) -> list[str]:
    return list(dict.fromkeys([text_field, *(path.split(".")[0] for path in select or {})]))


def _batch_texts(
    source: Source, batches: Iterator, text_field: str, select: dict | None, first_row: int, unreadable
) -> Generator[str, None, int]:
    """The selected texts of a stream of record batches whose first row is ``first_row``; returns
    the row after the last. A batch that cannot be read raises ``unreadable(exc, row)``."""
    import pyarrow as pa

    row = first_row
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return row
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(exc, row) from None
        keep = _selected_rows(source, batch, select)
        yield from _column_texts(source, batch.column(text_field), text_field, row, keep)
        row += batch.num_rows


def _parquet_documents(source: Source, text_field: str, select: dict | None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{source.path}: not a readable parquet file ({exc}): re-create it or {READ_FIX}") from None
    with parquet:
        _check_text_column(source, parquet.schema_arrow, text_field)
        columns = [c for c in _columns(text_field, select) if c in parquet.schema_arrow.names]
        row = 0
        for group in range(parquet.num_row_groups):

            def unreadable(exc, at_row, group=group):
                return CorpusError(
                    f"{source.path}, row group {group} (rows from {at_row}, counting from 0): cannot "
                    f"read it ({exc}): the file is corrupt or truncated; re-create it or {READ_FIX}"
                )

            batches = parquet.iter_batches(RECORD_BATCH_ROWS, row_groups=[group], columns=columns)
            row = yield from _batch_texts(source, batches, text_field, select, row, unreadable)


def _arrow_documents(source: Source, text_field: str, select: dict | None) -> Iterator[str]:
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
        yield from _batch_texts(source, batches, text_field, select, 0, unreadable)


# ------------------------------------------------------------------------- documents and the split

_READERS = {
    "text": _text_documents,
    "jsonl": _jsonl_documents,
    "parquet": _parquet_documents,
    "arrow": _arrow_documents,
}


def read_documents(source: Source, text_field: str = "text", select: dict | None = None) -> Iterator[str]:
    """The file's documents (non-empty strings), in order; with select, only those whose fields
    hold one of the accepted values. CorpusError if it holds none."""
    count, accepted = 0, {path: v if isinstance(v, (list, tuple)) else [v] for path, v in (select or {}).items()}
    for text in _READERS[source.kind](source, text_field, accepted):
        count += 1
        yield text
    if count == 0:
        if source.kind == "jsonl":
            what = f"without a document: no line has text in field '{text_field}'"
        else:
            what = f"without a document: no row has text in column '{text_field}'"
        if select:
            what += f" and fields matching corpus.select {select}"
        raise CorpusError(f"{source.path}: the file is {what}: add documents or {READ_FIX}")
