"""Corpus readers: every format LM corpora ship in gives the same documents and the same token
files, and every bad file is refused naming the file, the line or row, and the fix."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from upcycling.data import corpus, readers, streams
from upcycling.data.corpus import CorpusError, read_documents, resolve_sources
from upcycling.data.tokenize import tokenize_corpus

DOCUMENTS = [
    "It was the best of times, it was the worst of times.\nIt was the age of wisdom.\n",
    "Call me Ishmael.  Some years ago -- never mind how long precisely --\n\n\nI thought I would sail.\n",
    "Numbers 12345 and 3.14159, tabs\tand unicode: café, naïve, 日本語, emoji 🙂.\r\nCRLF line.\r\n",
    "  leading spaces, trailing spaces   \n\nand a literal <|endoftext|> inside the text.\n",
    "Short one.",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Whan that Aprille with his shoures soote\nThe droghte of March hath perced to the roote\n",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "Λορεμ ιπσουμ δολορ σιτ αμετ, кириллица тоже, and ASCII after it.\n",
    "Line one\nLine two\n\nParagraph two, with\ttabs and  double  spaces.\n",
]
TOKENIZER_CFG = {"vocab_size": 300, "min_frequency": 2}


def write_corpus(root: Path, fmt: str, documents: list[str] = DOCUMENTS, files: int = 3) -> list[str]:
    """The documents, in order, as `files` files (or one document per file for .txt) of fmt; the
    corpus.paths that name them."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        for i, text in enumerate(documents):
            (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8", newline="")
        return [str(root / "*.txt")]
    if fmt == "datasets":
        import datasets

        datasets.disable_progress_bars()
        ids = list(range(len(documents)))
        datasets.Dataset.from_dict({"id": ids, "text": documents}).save_to_disk(str(root / "ds"), num_shards=files)
        return [str(root / "ds")]
    chunks = np.array_split(np.arange(len(documents)), files)
    for i, chunk in enumerate(chunks):
        rows = [{"id": int(j), "text": documents[j], "meta": {"source": "test"}} for j in chunk]
        if fmt == "parquet":
            table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})
            pq.write_table(table, root / f"part{i}.parquet", row_group_size=2)
            continue
        data = "".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for r in rows).encode()
        name = root / f"chunk{i}.{fmt}"
        if fmt.endswith(".gz"):
            name.write_bytes(gzip.compress(data))
        elif fmt.endswith(".zst"):
            # Several frames, as pzstd writes them.
            half = len(data) // 2
            compressor = zstandard.ZstdCompressor()
            name.write_bytes(compressor.compress(data[:half]) + compressor.compress(data[half:]))
        else:
            name.write_bytes(data)
    return [str(root / f"*.{fmt.split('.')[-1]}")] if fmt != "parquet" else [str(root / "*.parquet")]


FORMATS = ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "json.zst", "parquet", "datasets"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_documents(fmt, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "RECORD_BATCH_ROWS", 1)  # parquet: several batches per row group
    monkeypatch.setattr(streams, "ZSTD_INPUT_BYTES", 7)  # zstd: frames span reads
    sources = resolve_sources(write_corpus(tmp_path, fmt))
    assert [text for source in sources for text in read_documents(source)] == DOCUMENTS


def test_the_same_text_in_every_format_gives_identical_token_files(tmp_path):
    outputs = {}
    for fmt in FORMATS:
        paths = write_corpus(tmp_path / fmt.replace(".", "_"), fmt)
        cfg = {"paths": paths, "val_fraction": 0.3, "split_seed": 0}
        outputs[fmt] = tmp_path / f"tokens_{fmt}"
        meta = tokenize_corpus(cfg, TOKENIZER_CFG, outputs[fmt])
        assert meta["train_documents"] and meta["val_documents"], fmt
    reference = outputs.pop("txt")
    files = ["tokenizer.json", "shards/00000-of-00001/train.bin", "shards/00000-of-00001/val.bin"]
    reference_meta = json.loads((reference / "meta.json").read_text())
    for fmt, out in outputs.items():
        for name in files:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), (fmt, name)
        meta = json.loads((out / "meta.json").read_text())
        for key in ("train_tokens", "val_tokens", "train_documents", "val_documents", "tokenizer_sha256"):
            assert meta[key] == reference_meta[key], (fmt, key)


def test_corpus_hash_follows_the_text_not_the_compression(tmp_path):
    metas = [
        tokenize_corpus(
            {"paths": write_corpus(tmp_path / fmt.replace(".", "_"), fmt), "val_fraction": 0.3},
            TOKENIZER_CFG,
            tmp_path / f"t_{fmt}",
        )
        for fmt in ("jsonl", "jsonl.gz", "jsonl.zst")
    ]
    assert len({meta["corpus_sha256"] for meta in metas}) == 1
    changed = list(DOCUMENTS)
    changed[4] = "Short two."
    other = tokenize_corpus(
        {"paths": write_corpus(tmp_path / "changed", "jsonl", changed), "val_fraction": 0.3},
        TOKENIZER_CFG,
        tmp_path / "t_changed",
    )
    assert other["corpus_sha256"] != metas[0]["corpus_sha256"]


def test_split_depends_on_the_text_only(tmp_path):
    """Renaming, reordering and re-chunking files keep every document on its side."""

    def held_out(paths):
        sources = resolve_sources(paths)
        return {doc.text: doc.held_out for doc in corpus.documents(sources, "text", 0.4, 7)}

    first = held_out(write_corpus(tmp_path / "a", "jsonl", files=3))
    second = held_out(write_corpus(tmp_path / "b", "parquet", DOCUMENTS[::-1], files=4))
    assert first == second and 0 < sum(first.values()) < len(DOCUMENTS)
    assert held_out(write_corpus(tmp_path / "c", "jsonl", files=2)) == first
    other_seed = {
        d.text: d.held_out
        for d in corpus.documents(resolve_sources(write_corpus(tmp_path / "d", "txt")), "text", 0.4, 8)
    }
    assert other_seed != first


def test_saved_dataset_directory_and_glob_and_labels(tmp_path):
    paths = write_corpus(tmp_path / "corpus", "datasets", files=2)
    sources = resolve_sources(paths)
    assert [s.kind for s in sources] == ["arrow", "arrow"]
    assert [Path(s.label).name for s in sources] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    # A glob over a directory of saved datasets picks the datasets up; relative labels stay relative.
    relative = resolve_sources(["corpus/*"], base_dir=tmp_path)
    assert [s.label for s in relative] == ["corpus/ds/data-00000-of-00002.arrow", "corpus/ds/data-00001-of-00002.arrow"]


def test_arrow_ipc_file_format_is_read_too(tmp_path):
    table = pa.table({"text": DOCUMENTS[:4]})
    with pa.ipc.new_file(tmp_path / "docs.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    assert list(read_documents(resolve_sources(tmp_path / "docs.arrow")[0])) == DOCUMENTS[:4]


def test_parquet_nulls_and_empty_texts_are_skipped(tmp_path):
    pq.write_table(pa.table({"content": ["a", None, "", "b"]}), tmp_path / "x.parquet")
    assert list(read_documents(resolve_sources(tmp_path / "x.parquet")[0], "content")) == ["a", "b"]


def test_estimated_text_bytes(tmp_path):
    data = "".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS * 50).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))  # size in the header
    with zstandard.ZstdCompressor().stream_writer(open(tmp_path / "b.jsonl.zst", "wb")) as writer:
        writer.write(data)  # streamed: no size in the header
    (tmp_path / "a.jsonl").write_bytes(data)
    unique = [f"{text} {i}" for i, text in enumerate(DOCUMENTS * 50)]  # as in a real corpus: no repeats
    pq.write_table(pa.table({"text": unique}), tmp_path / "a.parquet")
    estimates = {s.path.name: corpus.estimated_text_bytes(s) for s in resolve_sources(tmp_path / "*")}
    assert estimates["a.jsonl"] == estimates["a.jsonl.gz"] == estimates["a.jsonl.zst"] == len(data)
    size = (tmp_path / "b.jsonl.zst").stat().st_size
    assert estimates["b.jsonl.zst"] == int(size * corpus.COMPRESSION_RATIO_ESTIMATE)
    text_bytes = sum(len(t.encode()) for t in unique)
    assert text_bytes <= estimates["a.parquet"] < 2 * text_bytes


def bad_file(kind: str, root: Path):
    """(corpus paths, text_field, words the error must hold) for one kind of bad file."""
    good = write_corpus(root / "good", "jsonl")
    lines = [json.dumps({"text": t}) for t in DOCUMENTS[:4]]
    jsonl = ("\n".join(lines) + "\n").encode()
    field = "text"
    if kind == "zst truncated":
        (root / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl)[:-6])
        name, words = "cut.jsonl.zst", ["zstd", "truncated", "zstd -t"]
    elif kind == "zst truncated at a line end":
        frame = zstandard.ZstdCompressor(write_checksum=True).compress(jsonl)
        (root / "cut.jsonl.zst").write_bytes(frame[:-4])  # only the checksum is missing
        name, words = "cut.jsonl.zst", ["zstd", "truncated"]
    elif kind == "zst garbage":
        (root / "junk.jsonl.zst").write_bytes(b"this is not zstd at all")
        name, words = "junk.jsonl.zst", ["zstd", "corrupt"]
    elif kind == "zst bad line":
        data = jsonl + b'{"text": "cut\n'
        (root / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        name, words = "bad.jsonl.zst", ["line 5", "not valid JSON"]
    elif kind == "gz missing field":
        (root / "f.jsonl.gz").write_bytes(gzip.compress(jsonl + b'{"content": "x", "id": 3}\n'))
        name, words = "f.jsonl.gz", ["line 5", "no field 'text'", "'content'", "'id'", "corpus.text_field"]
    elif kind == "json array":
        (root / "array.json").write_text(json.dumps(DOCUMENTS))
        name, words = "array.json", ["line 1", "a JSON list, not an object"]
    elif kind == "parquet missing column":
        pq.write_table(pa.table({"content": DOCUMENTS}), root / "p.parquet")
        name, words = "p.parquet", ["no column 'text'", "'content'", "corpus.text_field"]
    elif kind == "parquet integer column":
        pq.write_table(pa.table({"text": list(range(5))}), root / "p.parquet")
        name, words = "p.parquet", ["column 'text' holds int64", "not strings", "corpus.text_field"]
    elif kind == "parquet invalid utf-8":
        data = b"goodbad\xfffine"
        offsets = np.array([0, 4, 8, 12], dtype=np.int32)
        column = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
        pq.write_table(pa.table({"text": column}), root / "p.parquet")
        name, words = "p.parquet", ["row 1 (counting from 0)", "invalid UTF-8", "column 'text'"]
    elif kind == "parquet truncated":
        pq.write_table(pa.table({"text": DOCUMENTS}), root / "full.parquet")
        (root / "p.parquet").write_bytes((root / "full.parquet").read_bytes()[:-20])
        (root / "full.parquet").unlink()
        name, words = "p.parquet", ["not a readable parquet file"]
    elif kind == "parquet corrupt row group":
        pq.write_table(
            pa.table({"text": DOCUMENTS * 4}),
            root / "p.parquet",
            row_group_size=10,
            compression="none",
            use_dictionary=False,
        )
        chunk = pq.ParquetFile(root / "p.parquet").metadata.row_group(2).column(0)
        data = bytearray((root / "p.parquet").read_bytes())
        page_end = chunk.data_page_offset + chunk.total_compressed_size
        data[page_end - 200 : page_end] = b"\xff" * 200  # the third row group's string lengths
        (root / "p.parquet").write_bytes(bytes(data))
        name, words = "p.parquet", ["row group 2 (rows from 20", "corrupt or truncated"]
    elif kind == "arrow stream truncated":
        table = pa.table({"text": DOCUMENTS * 4})
        with pa.OSFile(str(root / "full.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=10):
                writer.write_batch(batch)
        full = (root / "full.arrow").read_bytes()
        (root / "s.arrow").write_bytes(full[: len(full) * 3 // 5])
        (root / "full.arrow").unlink()
        name, words = "s.arrow", ["rows from 20", "not a readable Arrow IPC file"]
    elif kind == "parquet without text":
        pq.write_table(pa.table({"text": ["", None]}), root / "p.parquet")
        name, words = "p.parquet", ["without a document", "column 'text'"]
    elif kind == "dataset without the column":
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_dict({"body": DOCUMENTS}).save_to_disk(str(root / "ds"))
        name, words = "data-00000-of-00001.arrow", ["no column 'text'", "'body'"]
        return good + [str(root / "ds")], field, [name, *words]
    elif kind == "dataset dict":
        import datasets

        datasets.disable_progress_bars()
        split = datasets.Dataset.from_dict({"text": DOCUMENTS})
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(root / "dd"))
        return good + [str(root / "dd")], field, ["DatasetDict", "train, test", "dd/train"]
    elif kind == "dataset missing file":
        (root / "ds").mkdir()
        (root / "ds" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-0.arrow"}]}))
        return good + [str(root / "ds")], field, ["state.json", "data-0.arrow", "does not exist"]
    elif kind == "bz2":
        (root / "c.jsonl.bz2").write_bytes(b"BZh91AY&SY")
        name, words = "c.jsonl.bz2", ["'.bz2' files cannot be read", ".zst"]
    elif kind == "plain directory":
        (root / "dir").mkdir()
        return good + [str(root / "dir")], field, ["is a directory", "name its files"]
    else:
        raise AssertionError(kind)
    return good + [str(root / name)], field, [name, *words]


BAD_FILES = [
    "zst truncated",
    "zst truncated at a line end",
    "zst garbage",
    "zst bad line",
    "gz missing field",
    "json array",
    "parquet missing column",
    "parquet integer column",
    "parquet invalid utf-8",
    "parquet truncated",
    "parquet corrupt row group",
    "arrow stream truncated",
    "parquet without text",
    "dataset without the column",
    "dataset dict",
    "dataset missing file",
    "bz2",
    "plain directory",
]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_refused_naming_it_and_nothing_is_written(kind, tmp_path):
    paths, field, words = bad_file(kind, tmp_path / "corpus")
    (tmp_path / "out").mkdir()
    with pytest.raises(CorpusError) as caught:
        tokenize_corpus(
            {"paths": paths, "text_field": field, "val_fraction": 0.3, "shards": 2},
            TOKENIZER_CFG,
            tmp_path / "out" / "tokens",
        )
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert list((tmp_path / "out").iterdir()) == []  # no output, no temporary directory


def test_long_plain_text_without_blank_lines_is_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "DOCUMENT_SPLIT_CHARS", 100)
    monkeypatch.setattr(readers, "MAX_DOCUMENT_CHARS", 400)
    monkeypatch.setattr(readers, "READ_BLOCK_BYTES", 64)
    text = "".join(f"line {i} of a file without any blank line\n" for i in range(60))
    (tmp_path / "flat.txt").write_text(text)
    parts = list(read_documents(resolve_sources(tmp_path / "flat.txt")[0]))
    assert "".join(parts) == text and len(parts) > 3
    assert all(100 < len(p) <= 400 and p.endswith("\n") for p in parts[:-1])


SOURCES = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaWikipedia"]


def test_select_keeps_matching_records_in_every_record_format(tmp_path):
    """SlimPajama's CommonCrawl part: select on a nested field, in JSON Lines, parquet and arrow."""
    sets = [SOURCES[i % 3] for i in range(len(DOCUMENTS))]
    rows = [{"text": t, "meta": {"redpajama_set_name": s}, "n": i} for i, (t, s) in enumerate(zip(DOCUMENTS, sets))]
    (tmp_path / "a.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with pa.ipc.new_stream(tmp_path / "a.arrow", pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows), max_chunksize=4)
    wanted = [t for t, s in zip(DOCUMENTS, sets) if s in SOURCES[:2]]
    for name in ("a.jsonl.zst", "a.parquet", "a.arrow"):
        source = resolve_sources(tmp_path / name)[0]
        select = {"meta.redpajama_set_name": SOURCES[:2]}
        assert list(read_documents(source, "text", select)) == wanted, name
        assert list(read_documents(source, "text", {"n": 4})) == [DOCUMENTS[4]], name
        both = {"n": 4, "meta.redpajama_set_name": "RedPajamaC4"}
        assert list(read_documents(source, "text", both)) == [DOCUMENTS[4]]
        with pytest.raises(CorpusError, match="without a document.*matching corpus.select"):
            list(read_documents(source, "text", {"n": 4, "meta.redpajama_set_name": "RedPajamaWikipedia"}))


def test_select_is_part_of_the_stage(tmp_path):
    rows = [{"text": t, "lang": "en" if i % 2 else "fr"} for i, t in enumerate(DOCUMENTS)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"paths": [str(tmp_path / "a.jsonl")], "val_fraction": 0.3, "select": {"lang": "en"}}
    meta = tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "tokens")
    assert meta["train_documents"] + meta["val_documents"] == len(DOCUMENTS) // 2
    assert meta["select"] == {"lang": ["en"]}


@pytest.mark.parametrize("kind", ["jsonl missing field", "parquet missing column", "parquet wrong type", "text"])
def test_select_errors_name_the_file_and_the_fix(kind, tmp_path):
    if kind == "jsonl missing field":
        (tmp_path / "a.jsonl").write_text('{"text": "x", "meta": {"a": 1}}\n{"text": "y", "meta": {}}\n')
        name, select, words = "a.jsonl", {"meta.a": 1}, ["a.jsonl, line 2", "no field 'meta.a' for corpus.select"]
    elif kind == "parquet missing column":
        pq.write_table(pa.table({"text": ["x"], "meta": [{"a": 1}]}), tmp_path / "a.parquet")
        name, select, words = "a.parquet", {"meta.b": 1}, ["a.parquet", "no column 'meta.b' for corpus.select"]
    elif kind == "parquet wrong type":
        pq.write_table(pa.table({"text": ["x"], "n": [1]}), tmp_path / "a.parquet")
        name, select, words = "a.parquet", {"n": "one"}, ["a.parquet", "values for 'n' do not fit its type int64"]
    else:
        (tmp_path / "a.txt").write_text("x")
        name, select, words = "a.txt", {"n": 1}, ["a.txt", "plain text has no fields for corpus.select"]
    with pytest.raises(CorpusError) as caught:
        list(read_documents(resolve_sources(tmp_path / name)[0], "text", select))
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
