"""Tokens stage: corpus files -> byte-level BPE tokenizer -> train.bin / val.bin / meta.json.

Public: ``tokenize_corpus(corpus_cfg, tokenizer_cfg, out_dir)`` (the stage), ``load_tokens(dir)``
(what training reads), ``iter_documents(paths_or_globs, text_field)`` (the corpus reader),
``CorpusError`` (bad input: raised before any output exists) and ``TokenFilesError`` (token files
that do not match their meta.json). The file formats are in docs/contracts.md, "Tokens".

How the stage runs, in order, so that a bad input fails in seconds and leaves nothing behind:
1. resolve the globs and load a given tokenizer.json;
2. scan: read every file once (gunzip, strict UTF-8 decode, JSON parse), hashing the bytes and
   counting each split's documents; any problem raises CorpusError here;
3. in a temporary directory next to ``out_dir``: train the tokenizer on the training split (or
   copy the given one), encode both splits batch by batch straight into train.bin / val.bin, write
   meta.json; then rename the directory into place. On any error the temporary directory goes.

Documents. A JSONL line is one document (its ``text_field``; lines with empty text are skipped).
A plain-text file is one document, except that a file longer than DOCUMENT_SPLIT_CHARS is cut
into several, each ending at the first blank line past that length (so a single huge file can
still be split into train and validation, and each part ends with end-of-text).

Bounded memory. Text streams through in pieces of about PIECE_CHARS characters and batches of
about BATCH_CHARS, whatever the corpus size; only a single JSONL line is ever held whole. A piece
ends just before a space or newline that follows a non-space character: the byte-level
pre-tokenizer never joins across such a point, so a document encoded piece by piece gets exactly
the ids it would get in one call (a piece with no such point within PIECE_CHARS, i.e. a run of
that many characters without a space, is cut hard, and only there could ids differ).

Split. A document is held out for validation iff a hash of (split_seed, source name, document
index) falls below val_fraction, so the split is deterministic, independent of file order, and a
document keeps its side when other files are added. The source name is the file's path relative
to the deepest directory holding all sources, so moving the corpus does not reshuffle the split
(adding a file outside that directory does: the names change).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import InputError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
READ_BLOCK_BYTES = 1 << 20  # bytes read from disk at a time
PIECE_CHARS = 1 << 16  # most characters handed to the tokenizer as one batch item
BATCH_CHARS = 1 << 21  # characters per encode_batch call: 32+ pieces for the cores, ~170 MB peak RSS
DOCUMENT_SPLIT_CHARS = 1 << 20  # a longer plain-text file becomes several documents
LOG_EVERY_S = 10.0

# A blank line (possibly holding spaces) and the whitespace after it, up to the next text.
_NEW_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*(?=\S)")


class CorpusError(InputError):
    """An input of the tokens stage (corpus file, split, tokenizer.json) that cannot work.

    The message names the file and the fix. Raised before any output is written."""


class TokenFilesError(InputError):
    """Token files that do not match their meta.json (or are missing)."""


@dataclass(frozen=True)
class Source:
    path: Path  # the file to read
    label: str  # the path as the config names it (relative to base_dir if the glob was): for meta.json
    name: str  # path relative to the deepest directory holding all sources: the split's key
    is_jsonl: bool
    is_gzip: bool


class DocumentPiece(NamedTuple):
    source: str  # Source.name of the file it comes from
    index: int  # document index within that file (JSONL: 0-based line number)
    text: str
    last: bool  # the final piece of its document: end-of-text follows it


# ----------------------------------------------------------------------------------------------
# Reading the corpus


def resolve_sources(paths_or_globs, base_dir: str | os.PathLike | None = None) -> list[Source]:
    """Expand paths and globs (one or a list) into sources: each glob's matches sorted, the
    patterns in the order given, a file matched twice read once. Relative ones start at base_dir
    (default: the working directory)."""
    if isinstance(paths_or_globs, (str, os.PathLike)):
        paths_or_globs = [paths_or_globs]
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    files: dict[Path, str] = {}  # file -> label, in order
    for pattern in map(str, paths_or_globs):
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        if glob.has_magic(full):
            matches = [Path(m) for m in sorted(glob.glob(full, recursive=True)) if os.path.isfile(m)]
        elif os.path.isdir(full):
            raise CorpusError(
                f"corpus.paths: '{pattern}' is a directory: name its files, e.g. '{pattern}/*.txt'"
            )
        else:
            matches = [Path(full)] if os.path.isfile(full) else []
        if not matches:
            raise CorpusError(
                f"corpus.paths: '{pattern}' matches no file (looked in {base}): fix the path or glob"
            )
        for match in matches:
            label = match if os.path.isabs(pattern) else Path(os.path.relpath(match, base))
            files.setdefault(match, label.as_posix())

    common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    sources = []
    for path, label in files.items():
        stem = path.name[:-3] if path.name.endswith(".gz") else path.name
        name = Path(os.path.relpath(os.path.abspath(path), common)).as_posix()
        sources.append(Source(path, label, name, stem.endswith(".jsonl"), path.name.endswith(".gz")))
    return sources


def _open_binary(source: Source):
    return gzip.open(source.path, "rb") if source.is_gzip else open(source.path, "rb")


def _unreadable(source: Source, exc: BaseException) -> CorpusError:
    if source.is_gzip:
        return CorpusError(
            f"{source.path}: cannot read it as gzip ({exc}): the file is corrupt or truncated "
            f"('gzip -t {source.path}' checks it); re-create it or remove it from corpus.paths"
        )
    return CorpusError(
        f"{source.path}: cannot read it ({exc}): fix its permissions or remove it from corpus.paths"
    )


def _invalid_utf8(source: Source, offset: int, line: int, exc: UnicodeDecodeError) -> CorpusError:
    where = "decompressed byte" if source.is_gzip else "byte"
    return CorpusError(
        f"{source.path}: invalid UTF-8 at {where} {offset} (line {line}): {exc.reason}; re-encode the "
        f"file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from corpus.paths"
    )


def _read_text_blocks(source: Source, digest=None) -> Iterator[str]:
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
                if digest is not None:
                    digest.update(block)
                offset += len(block)
                newlines += block.count(b"\n")
                if text:
                    yield text
                if not block:
                    return
    except (OSError, EOFError, zlib.error) as exc:
        raise _unreadable(source, exc) from exc


def _safe_cut(text: str, limit: int, start: int = 0) -> int:
    """Where to end a piece that starts at start: the largest i <= limit with text[i] a newline
    (else a space) and text[i - 1] not whitespace. No byte-level pre-token spans such a point, so
    the ids do not change. limit if there is none (a hard cut)."""
    for separator in ("\n", " "):
        i = text.rfind(separator, start + 1, limit + 1)
        for _ in range(256):  # inside a run of whitespace: look a little further left, then give up
            if i <= start:
                break
            if not text[i - 1].isspace():
                return i
            i = text.rfind(separator, start + 1, i)
    return limit


def _piece_ends(text: str) -> list[int]:
    """End offsets of consecutive pieces of text, each at most PIECE_CHARS long; the last is len(text)."""
    ends, start = [], 0
    while len(text) - start > PIECE_CHARS:
        start = _safe_cut(text, start + PIECE_CHARS, start)
        ends.append(start)
    ends.append(len(text))
    return ends


def _iter_plain_text(source: Source, digest=None) -> Iterator[DocumentPiece]:
    index = 0  # document index within the file
    document_chars = 0  # characters of the current document already yielded
    pending = ""  # text read, not yet yielded
    read_any = has_text = False
    for block in _read_text_blocks(source, digest):
        read_any = True
        has_text = has_text or not block.isspace()
        pending += block
        # Past DOCUMENT_SPLIT_CHARS a document ends at the next blank line; the next starts at text.
        while document_chars + len(pending) > DOCUMENT_SPLIT_CHARS:
            boundary = _NEW_PARAGRAPH.search(pending, max(0, DOCUMENT_SPLIT_CHARS - document_chars))
            if boundary is None:
                break
            start = 0
            for end in _piece_ends(pending[: boundary.end()]):
                yield DocumentPiece(source.name, index, pending[start:end], end == boundary.end())
                start = end
            pending = pending[boundary.end() :]
            index, document_chars = index + 1, 0
        # Yield all but the last piece: the document may go on in the next block.
        start = 0
        for end in _piece_ends(pending)[:-1]:
            yield DocumentPiece(source.name, index, pending[start:end], False)
            start = end
        pending = pending[start:]
        document_chars += start
    if not has_text:
        what = "holds only whitespace" if read_any else "is empty"
        raise CorpusError(f"{source.path}: the file {what}: add text to it or remove it from corpus.paths")
    yield DocumentPiece(source.name, index, pending, True)


def _iter_jsonl(source: Source, text_field: str, digest=None) -> Iterator[DocumentPiece]:
    offset = 0  # bytes before the current line
    documents = 0
    try:
        with _open_binary(source) as fh:
            for line_index, raw in enumerate(fh):
                line_number = line_index + 1
                if digest is not None:
                    digest.update(raw)
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
                        f".jsonl file must be one JSON object; fix the line or the file's extension"
                    ) from None
                if not isinstance(record, dict):
                    raise CorpusError(
                        f"{where}: a JSON {type(record).__name__}, not an object: each line of a "
                        f".jsonl file must be one object holding the text in field '{text_field}'"
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
                if not text:
                    continue
                documents += 1
                start = 0
                for end in _piece_ends(text):
                    yield DocumentPiece(source.name, line_index, text[start:end], end == len(text))
                    start = end
    except (OSError, EOFError, zlib.error) as exc:
        raise _unreadable(source, exc) from exc
    if documents == 0:
        what = "empty" if offset == 0 else f"without a document: no line has text in field '{text_field}'"
        raise CorpusError(f"{source.path}: the file is {what}: add documents or remove it from corpus.paths")


def _iter_pieces(sources: list[Source], text_field: str, digest=None) -> Iterator[DocumentPiece]:
    for source in sources:
        if source.is_jsonl:
            yield from _iter_jsonl(source, text_field, digest)
        else:
            yield from _iter_plain_text(source, digest)


def iter_documents(
    paths_or_globs, text_field: str = "text", *, base_dir: str | os.PathLike | None = None
) -> Iterator[DocumentPiece]:
    """Stream the corpus as DocumentPieces: a document is the text of its consecutive pieces.

    .jsonl (one document per line, text in text_field) or any other name for plain text; either
    may be gzipped (.gz). Raises CorpusError naming the file for anything unreadable."""
    yield from _iter_pieces(resolve_sources(paths_or_globs, base_dir), text_field)


# ----------------------------------------------------------------------------------------------
# Split


def is_validation_document(split_seed: int, source_name: str, index: int, val_fraction: float) -> bool:
    key = f"{split_seed}\x00{source_name}\x00{index}".encode()
    draw = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return draw < val_fraction


def _with_split(
    pieces: Iterable[DocumentPiece], val_fraction: float, split_seed: int
) -> Iterator[tuple[bool, DocumentPiece]]:
    """Tag each piece with whether its document is held out (one hash per document)."""
    document, held_out = None, False
    for piece in pieces:
        if (piece.source, piece.index) != document:
            document = (piece.source, piece.index)
            held_out = is_validation_document(split_seed, piece.source, piece.index, val_fraction)
        yield held_out, piece


def iter_batches(
    sources: list[Source], text_field: str, val_fraction: float, split_seed: int
) -> Iterator[tuple[str, list[str], list[bool]]]:
    """What the stage hands to encode_batch: (split, texts, ends_document), the pieces of each
    split grouped into batches of about BATCH_CHARS characters, in corpus order."""
    texts: dict[str, list[str]] = {"train": [], "val": []}
    ends: dict[str, list[bool]] = {"train": [], "val": []}  # the piece ends its document
    chars = {"train": 0, "val": 0}
    for held_out, piece in _with_split(_iter_pieces(sources, text_field), val_fraction, split_seed):
        split = "val" if held_out else "train"
        texts[split].append(piece.text)
        ends[split].append(piece.last)
        chars[split] += len(piece.text)
        if chars[split] >= BATCH_CHARS:
            yield split, texts[split], ends[split]
            texts[split], ends[split], chars[split] = [], [], 0
    for split in ("train", "val"):
        if texts[split]:
            yield split, texts[split], ends[split]


@dataclass
class CorpusScan:
    """What the first pass learns: enough to refuse a bad corpus before any real work."""

    sources: list[Source]
    sha256: str
    train_documents: int
    val_documents: int
    chars: int  # decoded characters, for progress
    bytes: int  # bytes as read (after gunzip)


class _CountingSha256:
    """sha256 of everything fed to it, and how many bytes that was."""

    def __init__(self):
        self.sha256, self.bytes = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.bytes += len(data)


def scan_corpus(sources: list[Source], text_field: str, val_fraction: float, split_seed: int) -> CorpusScan:
    """Read everything once: decode, parse, hash, count each split's documents. Cheap next to BPE."""
    digest = _CountingSha256()
    documents = {False: 0, True: 0}
    chars = 0
    pieces = _iter_pieces(sources, text_field, digest)
    for held_out, piece in _with_split(pieces, val_fraction, split_seed):
        chars += len(piece.text)
        documents[held_out] += piece.last
    for side, count in (("training", documents[False]), ("validation", documents[True])):
        if count == 0:
            raise CorpusError(
                f"the {side} split is empty ({documents[False] + documents[True]} documents in "
                f"{len(sources)} files, corpus.val_fraction={val_fraction}, corpus.split_seed="
                f"{split_seed}): {'raise' if side == 'validation' else 'lower'} corpus.val_fraction "
                f"or add documents"
            )
    return CorpusScan(
        sources, digest.sha256.hexdigest(), documents[False], documents[True], chars, digest.bytes
    )


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the vocabulary, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a piece then encodes as it would inside its document.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer.json with an end-of-text token, or CorpusError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(
            f"tokenizer.path: {path} does not exist: give a Hugging Face tokenizer.json or set "
            f"tokenizer.path to null to train one on the corpus"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise CorpusError(
            f"tokenizer.path: {path} is not a loadable tokenizer.json ({exc}): give a file saved by "
            f"Hugging Face tokenizers or set tokenizer.path to null to train one"
        ) from exc
    if tokenizer.token_to_id(EOT_TOKEN) is None:
        raise CorpusError(
            f"tokenizer.path: {path} has no '{EOT_TOKEN}' token to end documents with: add it as a "
            f"special token or set tokenizer.path to null to train one"
        )
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_batch_ids(
    tokenizer: Tokenizer, texts: list[str], ends: list[bool], eot_id: int, dtype
) -> np.ndarray:
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


def _encode_pipelined(
    tokenizer: Tokenizer, batches, eot_id: int, dtype
) -> Iterator[tuple[str, np.ndarray, int, int]]:
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
                    split, future, documents, chars = in_flight.popleft()
                    yield split, future.result(), documents, chars
            while in_flight:
                split, future, documents, chars = in_flight.popleft()
                yield split, future.result(), documents, chars
        finally:
            for _, future, _, _ in in_flight:
                future.cancel()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The stage


class _Progress:
    """Logs documents, tokens, MB/s and ETA every LOG_EVERY_S seconds."""

    def __init__(self, total_documents: int, total_chars: int, bytes_per_char: float):
        self.total_documents, self.total_chars = total_documents, total_chars
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
            "tokens: %d/%d documents, %d tokens, %.2f MB/s, %.0f tokens/s, %.0f%% done, ETA %.0f s",
            self.documents, self.total_documents, self.tokens,
            self.chars * self.bytes_per_char / elapsed / 1e6, self.tokens / elapsed, 100 * done, eta,
        )  # fmt: skip


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished directory into place, replacing an older one only once all is written."""
    if not out_dir.exists():
        os.replace(tmp_dir, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)  # rename() cannot replace a non-empty directory
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        os.replace(old / out_dir.name, out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def tokenize_corpus(
    corpus_cfg: dict,
    tokenizer_cfg: dict,
    out_dir: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
) -> dict:
    """Write out_dir/{train.bin, val.bin, tokenizer.json, meta.json}; return the meta.

    corpus_cfg: paths, text_field, val_fraction, split_seed. tokenizer_cfg: vocab_size, path
    (a tokenizer.json to use as is, or None to train one), min_frequency. Relative paths start at
    base_dir (default: the working directory). Raises CorpusError before writing anything."""
    out_dir = Path(out_dir)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    text_field = corpus_cfg.get("text_field", "text")
    val_fraction = float(corpus_cfg.get("val_fraction", 0.1))
    split_seed = int(corpus_cfg.get("split_seed", 0))
    if not 0 < val_fraction < 1:
        raise CorpusError(f"corpus.val_fraction={val_fraction}: it must lie strictly between 0 and 1")

    # Cheap checks first: a given tokenizer, then one pass over the corpus.
    given_path = tokenizer_cfg.get("path")
    if given_path:
        given_path = Path(given_path) if os.path.isabs(given_path) else base / given_path
        tokenizer = load_tokenizer(given_path)
        logger.info("tokenizer: %s, given", given_path)
        vocab_size = tokenizer.get_vocab_size()
        if tokenizer_cfg.get("vocab_size") not in (None, vocab_size):
            logger.warning(
                "tokenizer.vocab_size=%s ignored: the given %s has %d tokens",
                tokenizer_cfg.get("vocab_size"), given_path, vocab_size,
            )  # fmt: skip
    else:
        vocab_size = int(tokenizer_cfg["vocab_size"])
        if vocab_size < 257:
            raise CorpusError(
                f"tokenizer.vocab_size={vocab_size}: byte-level BPE needs at least 257 tokens "
                f"(256 bytes and end-of-text)"
            )
    sources = resolve_sources(corpus_cfg["paths"], base)
    started = time.perf_counter()
    scan = scan_corpus(sources, text_field, val_fraction, split_seed)
    logger.info(
        "corpus: %d files, %d training and %d validation documents, %.1f M characters (scanned in %.2f s)",
        len(sources), scan.train_documents, scan.val_documents, scan.chars / 1e6,
        time.perf_counter() - started,
    )  # fmt: skip

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would become the published directory's.
    tmp_dir = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp_dir.mkdir()
    try:
        tokenizer_path = tmp_dir / "tokenizer.json"
        if given_path:
            shutil.copyfile(given_path, tokenizer_path)  # byte for byte: same hash as given
        else:
            started = time.perf_counter()
            training_texts = (
                text
                for split, texts, _ in iter_batches(sources, text_field, val_fraction, split_seed)
                if split == "train"
                for text in texts
            )
            min_frequency = int(tokenizer_cfg.get("min_frequency", 2))
            tokenizer = train_tokenizer(training_texts, vocab_size, min_frequency)
            tokenizer.save(str(tokenizer_path))
            logger.info(
                "tokenizer: byte-level BPE, %d tokens, trained in %.1f s",
                tokenizer.get_vocab_size(), time.perf_counter() - started,
            )  # fmt: skip
        vocab_size = tokenizer.get_vocab_size()
        eot_id = tokenizer.token_to_id(EOT_TOKEN)
        dtype = token_dtype(vocab_size)
        # A literal "<|endoftext|>" in the corpus is text, not a document boundary (after saving:
        # this setting is for this stage only, not part of the published tokenizer.json).
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True

        counts = {"train": [0, 0], "val": [0, 0]}  # split -> [tokens, documents]
        total_documents = scan.train_documents + scan.val_documents
        progress = _Progress(total_documents, scan.chars, scan.bytes / max(scan.chars, 1))
        with open(tmp_dir / "train.bin", "wb") as train_file, open(tmp_dir / "val.bin", "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            batches = iter_batches(sources, text_field, val_fraction, split_seed)
            for split, ids, documents, chars in _encode_pipelined(tokenizer, batches, eot_id, dtype):
                ids.tofile(files[split])
                counts[split][0] += len(ids)
                counts[split][1] += documents
                progress.update(documents, len(ids), chars)
        progress.update(0, 0, 0, force=True)

        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": vocab_size,
            "dtype": dtype.name,
            "eot_id": eot_id,
            "train_tokens": counts["train"][0],
            "val_tokens": counts["val"][0],
            "train_documents": counts["train"][1],
            "val_documents": counts["val"][1],
            "tokenizer_sha256": _sha256_file(tokenizer_path),
            "corpus_sha256": scan.sha256,
            "sources": [source.label for source in sources],
            "val_fraction": val_fraction,
            "split_seed": split_seed,
        }
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info(
        "tokens: %d training and %d validation tokens (%s) in %s",
        meta["train_tokens"], meta["val_tokens"], meta["dtype"], out_dir,
    )  # fmt: skip
    return meta


def load_tokens(directory: str | os.PathLike) -> tuple[np.memmap, np.memmap, dict]:
    """(train ids, validation ids, meta) of a tokens directory, checked against its meta.json."""
    directory = Path(directory)
    rebuild = "delete the directory and re-run the tokens stage"
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise TokenFilesError(f"{meta_path} does not exist: run the tokens stage first")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenFilesError(f"{meta_path} is not valid JSON ({exc}): {rebuild}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise TokenFilesError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}: {rebuild}"
        )
    if meta.get("dtype") not in ("uint16", "uint32") or meta["dtype"] != token_dtype(meta["vocab_size"]).name:
        raise TokenFilesError(
            f"{meta_path}: dtype {meta.get('dtype')!r} does not fit vocab_size "
            f"{meta.get('vocab_size')}: {rebuild}"
        )
    dtype = np.dtype(meta["dtype"])

    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file() or _sha256_file(tokenizer_path) != meta["tokenizer_sha256"]:
        raise TokenFilesError(
            f"{tokenizer_path} is missing or is not the tokenizer that made these tokens "
            f"(sha256 differs from meta.json): {rebuild}"
        )
    arrays = []
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * dtype.itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected or expected == 0:
            raise TokenFilesError(
                f"{path}: {'missing' if actual is None else f'{actual} bytes'}, but meta.json says "
                f"{meta[f'{split}_tokens']} {dtype.name} tokens ({expected} bytes): the files are "
                f"partial or from another run; {rebuild}"
            )
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return arrays[0], arrays[1], meta
