"""Tokens stage: every bad input refused with an error naming it, and nothing left behind (no
output, no temporary directory, the old output kept)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

# The torch-free unit lane (pytest tests/unit without the train extra) skips this file.
pytest.importorskip("torch")


from unit.test_tokenize import ONE_SHARD, PARAGRAPHS, TOKENIZER_CFG, corpus_cfg, leftovers, small_corpus, split_of
from upcycling.data import readers
from upcycling.data import tokenize as tk
from upcycling.data.corpus import read_documents, resolve_sources
from upcycling.data.tokenize import (
    CorpusError,
    TokenFilesError,
    load_tokens,
    tokenize_corpus,
)


def bad_input(kind: str, tmp_path: Path):
    """(corpus paths, tokenizer cfg, words the message must hold) for one kind of bad input."""
    corpus = small_corpus(tmp_path / "corpus", documents=4)
    paths = [str(corpus / "*.txt")]
    tokenizer_cfg = dict(TOKENIZER_CFG)
    if kind == "missing path":
        paths.append(str(corpus / "nothing_here" / "*.txt"))
        words = ["nothing_here", "matches no file"]
    elif kind == "empty file":
        (corpus / "empty.txt").write_bytes(b"")
        words = ["empty.txt", "empty"]
    elif kind == "whitespace file":
        (corpus / "blank.txt").write_text("\n \n\t\n")
        words = ["blank.txt", "whitespace"]
    elif kind == "invalid utf-8":
        (corpus / "latin1.txt").write_bytes("hello\nwörld\n".encode("latin-1"))
        words = ["latin1.txt", "invalid UTF-8", "byte 7", "line 2"]
    elif kind == "jsonl without the field":
        (corpus / "docs.jsonl").write_text('{"text": "fine"}\n{"content": "x", "id": 3}\n')
        paths.append(str(corpus / "docs.jsonl"))
        words = ["docs.jsonl", "line 2", "'text'", "'content'", "'id'", "corpus.text_field"]
    elif kind == "jsonl bad line":
        (corpus / "docs.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
        paths.append(str(corpus / "docs.jsonl"))
        words = ["docs.jsonl", "line 2", "not valid JSON"]
    elif kind == "corrupt gzip":
        (corpus / "bad.txt.gz").write_bytes(b"this is not gzip at all")
        paths.append(str(corpus / "bad.txt.gz"))
        words = ["bad.txt.gz", "gzip"]
    elif kind == "truncated gzip":
        (corpus / "cut.txt.gz").write_bytes(gzip.compress(PARAGRAPHS[0].encode() * 50)[:-30])
        paths.append(str(corpus / "cut.txt.gz"))
        words = ["cut.txt.gz", "gzip", "truncated"]
    elif kind == "missing tokenizer":
        tokenizer_cfg["path"] = str(tmp_path / "no_tokenizer.json")
        words = ["no_tokenizer.json", "does not exist", "tokenizer.path"]
    elif kind == "unloadable tokenizer":
        (tmp_path / "broken.json").write_text('{"not": "a tokenizer"}')
        tokenizer_cfg["path"] = str(tmp_path / "broken.json")
        words = ["broken.json", "not a loadable tokenizer.json"]
    elif kind in ("empty validation split", "empty training split"):
        want_val = kind == "empty training split"
        paths = [str(next(p for p in sorted(corpus.glob("*.txt")) if split_of(p, 0.3) == want_val))]
        side, fix = ("training", "lower") if want_val else ("validation", "raise")
        words = [f"{side} split is empty", f"{fix} corpus.val_fraction or add documents"]
    elif kind == "too many shards":
        return paths, tokenizer_cfg, ["corpus.shards=9", "4 files", "whole files"], 9
    else:
        raise AssertionError(kind)
    return paths, tokenizer_cfg, words, 1


BAD_INPUTS = [
    "missing path",
    "empty file",
    "whitespace file",
    "invalid utf-8",
    "jsonl without the field",
    "jsonl bad line",
    "corrupt gzip",
    "truncated gzip",
    "missing tokenizer",
    "unloadable tokenizer",
    "empty validation split",
    "empty training split",
    "too many shards",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_raises_and_leaves_nothing(kind, tmp_path):
    paths, tokenizer_cfg, words, shards = bad_input(kind, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CorpusError) as caught:
        tokenize_corpus(corpus_cfg(paths, 0.3, shards), tokenizer_cfg, tmp_path / "out" / "tokens")
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no temporary directory


def test_empty_split_over_several_shards_is_refused_at_the_gather(tmp_path):
    corpus = small_corpus(tmp_path / "corpus", documents=6)
    training = [p for p in sorted(corpus.glob("*.txt")) if not split_of(p, 0.3)]
    with pytest.raises(CorpusError, match="validation split is empty"):
        tokenize_corpus(corpus_cfg(training, 0.3, shards=2), TOKENIZER_CFG, tmp_path / "tokens")
    assert leftovers(tmp_path, keep={"corpus"}) == []


def test_invalid_utf8_offset_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "READ_BLOCK_BYTES", 3)
    (tmp_path / "x.txt").write_bytes("ab\ncé\nd".encode() + b"\xc3(" + b"\n")  # é straddles a block
    with pytest.raises(CorpusError, match=r"x\.txt: invalid UTF-8 at byte 8 \(line 3\)"):
        list(read_documents(resolve_sources(tmp_path / "x.txt")[0]))


def test_failure_while_encoding_keeps_old_output_and_cleans_up(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path / "corpus")
    cfg = corpus_cfg([corpus / "*.txt"])
    tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "tokens")
    old = {p: p.read_bytes() for p in (tmp_path / "tokens").rglob("*") if p.is_file()}

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tk, "encode_batch_ids", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        tokenize_corpus(cfg, {**TOKENIZER_CFG, "vocab_size": 300}, tmp_path / "tokens")
    assert {p: p.read_bytes() for p in (tmp_path / "tokens").rglob("*") if p.is_file()} == old
    assert leftovers(tmp_path, keep={"corpus", "tokens"}) == []


def test_load_tokens_refuses_files_that_do_not_match(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    out = tmp_path / "tokens"
    tokenize_corpus(corpus_cfg([corpus / "*.txt"]), TOKENIZER_CFG, out)
    with open(out / ONE_SHARD / "val.bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(TokenFilesError, match="val.bin"):
        load_tokens(out)
    (out / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(TokenFilesError, match="format_version 1, this code reads 2"):
        load_tokens(out)
    (out / "meta.json").unlink()
    with pytest.raises(TokenFilesError, match="meta.json does not exist"):
        load_tokens(out)
