"""Tokens stage: round trip, sidecar, determinism, input formats, and every bad input refused cleanly."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from upcycling import tokenize as tk
from upcycling.tokenize import CorpusError, TokenFilesError, iter_documents, load_tokens, tokenize_corpus

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "corpus" / "shakespeare"
# With split_seed 0 and val_fraction 0.1, merchant_of_venice is held out and macbeth is not.
TRAIN_PLAY, VAL_PLAY = "macbeth.txt.gz", "merchant_of_venice.txt.gz"

PARAGRAPHS = [
    "It was the best of times, it was the worst of times.\nIt was the age of wisdom.\n",
    "Call me Ishmael.  Some years ago -- never mind how long precisely --\n\n\nI thought I would sail.\n",
    "Numbers 12345 and 3.14159, tabs\tand unicode: café, naïve, 日本語, emoji 🙂.\r\nCRLF line.\r\n",
    "  leading spaces, trailing spaces   \n\nand a literal <|endoftext|> inside the text.\n",
]


def small_corpus(root: Path, documents: int = 12) -> Path:
    """A directory of small plain-text files, one document each."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        text = "".join(PARAGRAPHS[(i + j) % len(PARAGRAPHS)] for j in range(3)) + f"Document {i}.\n"
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8", newline="")
    return root


def corpus_cfg(paths, val_fraction=0.3) -> dict:
    return {"paths": [str(p) for p in paths], "text_field": "text", "val_fraction": val_fraction, "split_seed": 0}


TOKENIZER_CFG = {"vocab_size": 320, "path": None, "min_frequency": 2}


def decoded_documents(ids: np.ndarray, tokenizer: Tokenizer, eot_id: int) -> list[str]:
    ends = np.flatnonzero(ids == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)]


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def shakespeare_tokens(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare") / "tokens"
    cfg = corpus_cfg([SHAKESPEARE / TRAIN_PLAY, SHAKESPEARE / VAL_PLAY], val_fraction=0.1)
    meta = tokenize_corpus(cfg, {"vocab_size": 512, "path": None, "min_frequency": 2}, out)
    return out, meta


def test_shakespeare_round_trip_and_sidecar(shakespeare_tokens):
    out, meta = shakespeare_tokens
    train, val, loaded_meta = load_tokens(out)
    assert loaded_meta == meta == json.loads((out / "meta.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]

    # The sidecar describes the files.
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16" and train.dtype == np.uint16
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    assert meta["sources"] == [(SHAKESPEARE / TRAIN_PLAY).as_posix(), (SHAKESPEARE / VAL_PLAY).as_posix()]
    assert meta["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    corpus = b"".join(gzip.open(SHAKESPEARE / name).read() for name in (TRAIN_PLAY, VAL_PLAY))
    assert meta["corpus_sha256"] == hashlib.sha256(corpus).hexdigest()
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert meta["vocab_size"] == tokenizer.get_vocab_size() <= 512
    assert meta["eot_id"] == tokenizer.token_to_id("<|endoftext|>")
    for ids in (train, val):
        assert int(ids.max()) < meta["vocab_size"]
        assert int((ids == meta["eot_id"]).sum()) == 1 and ids[-1] == meta["eot_id"]

    # Held-out text round-trips, and the token files decode to exactly the plays.
    val_text = gzip.open(SHAKESPEARE / VAL_PLAY).read().decode()
    assert tokenizer.decode(tokenizer.encode(val_text).ids) == val_text
    assert decoded_documents(np.asarray(val), tokenizer, meta["eot_id"]) == [val_text]
    # Encoded in pieces, yet the same ids as the whole play in one call.
    assert val[:-1].tolist() == tokenizer.encode(val_text).ids
    train_text = gzip.open(SHAKESPEARE / TRAIN_PLAY).read().decode()
    assert decoded_documents(np.asarray(train), tokenizer, meta["eot_id"]) == [train_text]


def test_pieces_encode_like_whole_documents(shakespeare_tokens, tmp_path, monkeypatch):
    """Cutting documents into small pieces for encode_batch must not change a single id."""
    out, meta = shakespeare_tokens
    monkeypatch.setattr(tk, "PIECE_CHARS", 700)
    monkeypatch.setattr(tk, "BATCH_CHARS", 5000)
    monkeypatch.setattr(tk, "READ_BLOCK_BYTES", 999)
    pieces = list(iter_documents([SHAKESPEARE / VAL_PLAY]))
    assert len(pieces) > 100 and max(len(p.text) for p in pieces) <= 700
    cfg = corpus_cfg([SHAKESPEARE / TRAIN_PLAY, SHAKESPEARE / VAL_PLAY], val_fraction=0.1)
    small = tokenize_corpus(cfg, {"vocab_size": 512, "path": str(out / "tokenizer.json")}, tmp_path / "tokens")
    assert small == meta
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "tokens" / name).read_bytes() == (out / name).read_bytes()


def test_determinism(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    cfg = corpus_cfg([corpus / "*.txt"])
    first = tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "a")
    second = tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "b")
    assert first == second
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Re-running into an existing directory replaces it.
    assert tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "a") == first
    assert leftovers(tmp_path, keep={"corpus", "a", "b"}) == []


def test_gzip_jsonl_and_globs(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = {
        "plain.txt": PARAGRAPHS[0],
        "packed.txt.gz": PARAGRAPHS[1],
    }
    (corpus / "plain.txt").write_text(texts["plain.txt"])
    with gzip.open(corpus / "packed.txt.gz", "wt", encoding="utf-8", newline="") as fh:
        fh.write(texts["packed.txt.gz"])
    jsonl_docs = [PARAGRAPHS[2], PARAGRAPHS[3], "short one", PARAGRAPHS[0] * 3]
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(jsonl_docs)]
    (corpus / "sub" / "a.jsonl").write_text("\n".join(lines[:2] + ["", json.dumps({"text": ""})]) + "\n")
    with gzip.open(corpus / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines[2:]) + "\n")

    pieces = list(iter_documents([corpus / "*.txt*", corpus / "sub" / "*.jsonl*"]))
    assert [(p.source, p.index) for p in pieces] == [
        ("packed.txt.gz", 0), ("plain.txt", 0), ("sub/a.jsonl", 0), ("sub/a.jsonl", 1),
        ("sub/b.jsonl.gz", 0), ("sub/b.jsonl.gz", 1),
    ]  # fmt: skip
    assert all(p.last for p in pieces)  # small documents are single pieces
    expected = [texts["packed.txt.gz"], texts["plain.txt"], *jsonl_docs]
    assert [p.text for p in pieces] == expected

    out = tmp_path / "tokens"
    meta = tokenize_corpus(corpus_cfg([corpus / "**" / "*.*"], val_fraction=0.4), TOKENIZER_CFG, out)
    assert meta["train_documents"] + meta["val_documents"] == len(expected)
    train, val, _ = load_tokens(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    documents = decoded_documents(np.asarray(train), tokenizer, meta["eot_id"])
    documents += decoded_documents(np.asarray(val), tokenizer, meta["eot_id"])
    assert sorted(documents) == sorted(expected)  # literal "<|endoftext|>" stayed text


def test_given_tokenizer_is_used_as_is(shakespeare_tokens, tmp_path):
    out, _ = shakespeare_tokens
    given = tmp_path / "given.json"
    given.write_bytes((out / "tokenizer.json").read_bytes())
    corpus = small_corpus(tmp_path / "corpus")
    meta = tokenize_corpus(corpus_cfg([corpus / "*.txt"]), {"vocab_size": 999, "path": str(given)}, tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.json").read_bytes() == given.read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(given.read_bytes()).hexdigest()
    assert meta["vocab_size"] == Tokenizer.from_file(str(given)).get_vocab_size()


def test_big_plain_text_file_becomes_documents_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "DOCUMENT_SPLIT_CHARS", 300)
    monkeypatch.setattr(tk, "PIECE_CHARS", 128)
    monkeypatch.setattr(tk, "READ_BLOCK_BYTES", 100)
    text = "".join(PARAGRAPHS * 6)
    (tmp_path / "big.txt").write_text(text, newline="")
    pieces = list(iter_documents([tmp_path / "big.txt"]))
    assert max(len(p.text) for p in pieces) <= 128
    documents: dict[int, str] = {}
    for piece in pieces:
        documents[piece.index] = documents.get(piece.index, "") + piece.text
    assert "".join(documents.values()) == text
    assert len(documents) > 3 and list(documents) == list(range(len(documents)))
    for index, document in documents.items():
        assert len(document) > 300 or index == len(documents) - 1
        assert index == 0 or not document[0].isspace()  # a document starts at text after a blank line
        assert index == len(documents) - 1 or document.endswith("\n")


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
    elif kind == "empty validation split":
        paths = [str(corpus / "doc01.txt")]  # a training document at split_seed 0, val_fraction 0.3
        words = ["validation split is empty", "raise corpus.val_fraction or add documents"]
    elif kind == "empty training split":
        paths = [str(corpus / "doc00.txt")]  # a validation document
        words = ["training split is empty", "lower corpus.val_fraction or add documents"]
    else:
        raise AssertionError(kind)
    return paths, tokenizer_cfg, words


BAD_INPUTS = [
    "missing path", "empty file", "whitespace file", "invalid utf-8", "jsonl without the field",
    "jsonl bad line", "corrupt gzip", "truncated gzip", "missing tokenizer", "unloadable tokenizer",
    "empty validation split", "empty training split",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_raises_and_leaves_nothing(kind, tmp_path):
    paths, tokenizer_cfg, words = bad_input(kind, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CorpusError) as caught:
        tokenize_corpus(corpus_cfg(paths, val_fraction=0.3), tokenizer_cfg, tmp_path / "out" / "tokens")
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no temporary directory


def test_invalid_utf8_offset_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "READ_BLOCK_BYTES", 3)
    (tmp_path / "x.txt").write_bytes("ab\ncé\nd".encode() + b"\xc3(" + b"\n")  # é straddles a block
    with pytest.raises(CorpusError, match=r"x\.txt: invalid UTF-8 at byte 8 \(line 3\)"):
        list(iter_documents([tmp_path / "x.txt"]))


def test_failure_while_encoding_keeps_old_output_and_cleans_up(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path / "corpus")
    cfg = corpus_cfg([corpus / "*.txt"])
    tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "tokens")
    old = {p.name: p.read_bytes() for p in (tmp_path / "tokens").iterdir()}

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tk, "encode_batch_ids", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        tokenize_corpus(cfg, {**TOKENIZER_CFG, "vocab_size": 300}, tmp_path / "tokens")
    assert {p.name: p.read_bytes() for p in (tmp_path / "tokens").iterdir()} == old
    assert leftovers(tmp_path, keep={"corpus", "tokens"}) == []


def test_load_tokens_refuses_files_that_do_not_match(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    out = tmp_path / "tokens"
    tokenize_corpus(corpus_cfg([corpus / "*.txt"]), TOKENIZER_CFG, out)
    with open(out / "val.bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(TokenFilesError, match="val.bin"):
        load_tokens(out)
    (out / "meta.json").unlink()
    with pytest.raises(TokenFilesError, match="meta.json does not exist"):
        load_tokens(out)


def test_long_jsonl_document_is_cut_into_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "PIECE_CHARS", 50)
    text = "".join(PARAGRAPHS) * 3
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    pieces = list(iter_documents(tmp_path / "one.jsonl"))
    assert len(pieces) > 5 and all(len(p.text) <= 50 and p.index == 0 for p in pieces)
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == text
