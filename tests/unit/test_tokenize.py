"""Tokens stage: round trip, sidecars, determinism, shards that change nothing, the tokenizer's
sample, and every bad input refused cleanly."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

# The torch-free unit lane (pytest tests/unit without the train extra) skips this file.
pytest.importorskip("torch")

from tokenizers import Tokenizer

from upcycling.data import corpus as corpus_module
from upcycling.data import readers
from upcycling.data import tokenize as tk
from upcycling.data import tokenizer as tok
from upcycling.data import tokens as layout
from upcycling.data.corpus import read_documents, resolve_sources
from upcycling.data.tokenize import (
    CorpusError,
    CorpusOptions,
    TokenFilesError,
    gather_shards,
    load_tokens,
    make_tokenizer,
    tokenize_corpus,
    tokenize_shard,
)
from upcycling.data.windows import TokenWindows

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "corpus" / "shakespeare"
# The split hashes each document's text: at split_seed 0 and val_fraction 0.1 macbeth is held out
# and merchant_of_venice is not.
TRAIN_PLAY, VAL_PLAY = "merchant_of_venice.txt.gz", "macbeth.txt.gz"
PLAYS = ["hamlet", "macbeth", "tempest", "sonnets", "othello", "lear", "lovers_complaint", "pericles"]

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


def corpus_cfg(paths, val_fraction=0.3, shards=1) -> dict:
    return {
        "paths": [str(p) for p in paths],
        "text_field": "text",
        "val_fraction": val_fraction,
        "split_seed": 0,
        "shards": shards,
    }


TOKENIZER_CFG = {"vocab_size": 320, "path": None, "min_frequency": 2}
ONE_SHARD = Path("shards") / "00000-of-00001"


def decoded_documents(ids: np.ndarray, tokenizer: Tokenizer, eot_id: int) -> list[str]:
    ends = np.flatnonzero(ids == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)]


def everything(stream) -> np.ndarray:
    return np.asarray(stream.read(0, len(stream)))


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def split_of(path: Path, val_fraction: float, seed: int = 0) -> bool:
    """Whether the one-document file is held out."""
    text = next(read_documents(resolve_sources(path)[0]))
    return corpus_module.is_held_out(hashlib.sha256(text.encode()).digest(), seed, val_fraction)


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
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shards", "tokenizer.json", "tokenizer.training.json"]
    assert sorted(p.name for p in (out / ONE_SHARD).iterdir()) == ["shard.json", "train.bin", "val.bin"]

    # The sidecar describes the files.
    assert meta["format_version"] == 2 and meta["dtype"] == "uint16" and train.parts[0].dtype == np.uint16
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    largest = max(int(everything(train).max()), int(everything(val).max()))
    assert meta["shards"] == [
        {"path": ONE_SHARD.as_posix(), "train_tokens": len(train), "val_tokens": len(val), "max_token_id": largest}
    ]
    assert meta["sources"] == [(SHAKESPEARE / TRAIN_PLAY).as_posix(), (SHAKESPEARE / VAL_PLAY).as_posix()]
    assert meta["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    file_hashes = [
        hashlib.sha256(hashlib.sha256(gzip.decompress((SHAKESPEARE / name).read_bytes())).digest()).hexdigest()
        for name in (TRAIN_PLAY, VAL_PLAY)
    ]
    assert meta["corpus_sha256"] == hashlib.sha256("".join(f"{h}\n" for h in file_hashes).encode()).hexdigest()
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert meta["vocab_size"] == tokenizer.get_vocab_size() <= 512
    assert meta["eot_id"] == tokenizer.token_to_id("<|endoftext|>")
    for ids in (everything(train), everything(val)):
        assert int(ids.max()) < meta["vocab_size"]
        assert int((ids == meta["eot_id"]).sum()) == 1 and ids[-1] == meta["eot_id"]

    # Held-out text round-trips, and the token files decode to exactly the plays.
    val_text = gzip.decompress((SHAKESPEARE / VAL_PLAY).read_bytes()).decode()
    assert tokenizer.decode(tokenizer.encode(val_text).ids) == val_text
    assert decoded_documents(everything(val), tokenizer, meta["eot_id"]) == [val_text]
    # Encoded in pieces, yet the same ids as the whole play in one call.
    assert everything(val)[:-1].tolist() == tokenizer.encode(val_text).ids
    train_text = gzip.decompress((SHAKESPEARE / TRAIN_PLAY).read_bytes()).decode()
    assert decoded_documents(everything(train), tokenizer, meta["eot_id"]) == [train_text]


def test_pieces_encode_like_whole_documents(shakespeare_tokens, tmp_path, monkeypatch):
    """Cutting documents into small pieces for encode_batch must not change a single id."""
    out, meta = shakespeare_tokens
    monkeypatch.setattr(tok, "PIECE_CHARS", 700)
    monkeypatch.setattr(tk, "BATCH_CHARS", 5000)
    monkeypatch.setattr(readers, "READ_BLOCK_BYTES", 999)
    text = next(read_documents(resolve_sources(SHAKESPEARE / VAL_PLAY)[0]))
    pieces = list(tok.pieces(text))
    assert len(pieces) > 100 and max(map(len, pieces)) <= 700 and "".join(pieces) == text
    cfg = corpus_cfg([SHAKESPEARE / TRAIN_PLAY, SHAKESPEARE / VAL_PLAY], val_fraction=0.1)
    small = tokenize_corpus(cfg, {"vocab_size": 512, "path": str(out / "tokenizer.json")}, tmp_path / "tokens")
    # Given (not trained) here, the tokenizer has no vocabulary request to record; all else is equal.
    trained_only = ("vocab_size_requested", "vocab_size_reached")
    assert small == {key: value for key, value in meta.items() if key not in trained_only}
    for name in (ONE_SHARD / "train.bin", ONE_SHARD / "val.bin", "tokenizer.json"):
        assert (tmp_path / "tokens" / name).read_bytes() == (out / name).read_bytes()


@pytest.fixture(scope="module")
def plays_one_and_four_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    paths = [SHAKESPEARE / f"{play}.txt.gz" for play in PLAYS]
    tokenizer_cfg = {"vocab_size": 400, "min_frequency": 2}
    one = tokenize_corpus(corpus_cfg(paths, val_fraction=0.3, shards=1), tokenizer_cfg, root / "one")
    four = tokenize_corpus(corpus_cfg(paths, val_fraction=0.3, shards=4), tokenizer_cfg, root / "four")
    return root, one, four


def test_four_shards_give_the_one_shard_stream_and_batches(plays_one_and_four_shards):
    root, one, four = plays_one_and_four_shards
    assert len(one["shards"]) == 1 and len(four["shards"]) == 4
    assert {k: v for k, v in one.items() if k != "shards"} == {k: v for k, v in four.items() if k != "shards"}
    assert (root / "one" / "tokenizer.json").read_bytes() == (root / "four" / "tokenizer.json").read_bytes()
    train_1, val_1, _ = load_tokens(root / "one")
    train_4, val_4, _ = load_tokens(root / "four")
    assert len(train_4.parts) > 1 and len(val_4.parts) > 1
    assert np.array_equal(everything(train_1), everything(train_4))
    assert np.array_equal(everything(val_1), everything(val_4))

    seq_len = 512  # long windows: many of them span two shards
    windows_1, windows_4 = TokenWindows(train_1, seq_len), TokenWindows(train_4, seq_len)
    boundaries = train_4.offsets[1:-1]
    spanning = 0
    for step in range(20):
        starts = np.random.default_rng([3, step]).integers(0, len(train_1) - seq_len - 1, size=16)
        spanning += int(((starts[:, None] < boundaries) & (starts[:, None] + seq_len + 1 > boundaries)).any(1).sum())
        for row_slice in (slice(0, 16), slice(4, 8)):
            a = windows_1.train_batch(3, step, 16, row_slice, valid_tokens=16 * seq_len - 700)
            b = windows_4.train_batch(3, step, 16, row_slice, valid_tokens=16 * seq_len - 700)
            assert all(torch_equal(x, y) for x, y in zip(a, b))
    assert spanning > 0  # the comparison covered windows across a shard boundary
    for x, y in zip(TokenWindows(val_1, 64).eval_windows(32), TokenWindows(val_4, 64).eval_windows(32)):
        assert torch_equal(x, y)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_rank_rows_and_masking_match_the_global_batch(plays_one_and_four_shards):
    root, _, _ = plays_one_and_four_shards
    train, _, _ = load_tokens(root / "four")
    windows = TokenWindows(train, 128)
    inputs, targets = windows.train_batch(0, 5, 8, slice(0, 8), valid_tokens=8 * 128 - 300)
    assert int((targets == -100).sum()) == 300 and bool((targets.view(-1)[-300:] == -100).all())
    halves = [windows.train_batch(0, 5, 8, slice(r * 4, r * 4 + 4), valid_tokens=8 * 128 - 300) for r in (0, 1)]
    assert torch_equal(inputs, np_cat([h[0] for h in halves])) and torch_equal(targets, np_cat([h[1] for h in halves]))
    starts = np.random.default_rng([0, 5]).integers(0, len(train) - 129, size=8)
    assert inputs[2].tolist() == everything(train)[starts[2] : starts[2] + 128].tolist()


def np_cat(tensors):
    import torch

    return torch.cat(tensors)


def test_steps_one_by_one_equal_tokenize_corpus(plays_one_and_four_shards, tmp_path):
    """The Snakemake path (tokenizer job, shard jobs in any order, gather) writes what the
    one-process stage writes."""
    root, _, four = plays_one_and_four_shards
    paths = [SHAKESPEARE / f"{play}.txt.gz" for play in PLAYS]
    sources, options = resolve_sources(paths), CorpusOptions(val_fraction=0.3)
    out = tmp_path / "tokens"
    make_tokenizer(sources, options, {"vocab_size": 400}, layout.tokenizer_path(out))
    groups = tk.shard_sources(sources, 4)
    for index in (2, 0, 3, 1):
        tokenize_shard(groups[index], options, layout.tokenizer_path(out), layout.shard_dir(out, index, 4), index, 4)
    labels = [[s.label for s in group] for group in groups]
    assert gather_shards(out, labels, options) == four
    for path in layout.tokens_outputs(out, 4)["tokenize_shard"]:
        reference = root / "four" / path.relative_to(out)
        assert path.read_bytes() == reference.read_bytes(), path

    # A shard that no longer matches the plan, the tokenizer or its own sidecar is refused.
    with pytest.raises(TokenFilesError, match="files"):
        gather_shards(out, [labels[0][::-1], *labels[1:]], options)
    with pytest.raises(TokenFilesError, match="val_fraction"):
        gather_shards(out, labels, CorpusOptions(val_fraction=0.2))
    with open(layout.shard_dir(out, 1, 4) / "train.bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(TokenFilesError, match="00001-of-00004.*train.bin size.*forcerun tokenize_shard"):
        gather_shards(out, labels, options)


def test_tokenizer_sample_takes_an_equal_share_of_every_file(tmp_path):
    corpus = small_corpus(tmp_path / "corpus", documents=2)
    # Two JSONL files of many training documents; a small sample reads only each file's first ones.
    documents = [f"{PARAGRAPHS[i % 4]} number {i}" for i in range(200)]
    options = CorpusOptions(val_fraction=0.01)
    for name, part in (("a.jsonl", documents[:100]), ("b.jsonl", documents[100:])):
        (corpus / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    sources = resolve_sources([corpus / "*.jsonl"])
    sample = "".join(tok.tokenizer_sample(sources, options, sample_bytes=2000))
    held_out = {d.text for d in options.documents(sources) if d.held_out}
    first_a = [t for t in documents[:100] if t not in held_out]
    first_b = [t for t in documents[100:] if t not in held_out]
    taken_a = next(i for i in range(1, 100) if sum(len(t.encode()) for t in first_a[:i]) >= 1000)
    taken_b = next(i for i in range(1, 100) if sum(len(t.encode()) for t in first_b[:i]) >= 1000)
    assert sample == "".join(first_a[:taken_a] + first_b[:taken_b])
    # The sample decides the tokenizer: training on it by hand gives the same file.
    make_tokenizer(sources, options, {"vocab_size": 300, "sample_bytes": 2000}, tmp_path / "tok.json")
    by_hand = tok.train_tokenizer(first_a[:taken_a] + first_b[:taken_b], 300, 2)
    assert json.loads((tmp_path / "tok.json").read_text()) == json.loads(by_hand.to_str())


def test_determinism(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    cfg = corpus_cfg([corpus / "*.txt"])
    first = tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "a")
    second = tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "b")
    assert first == second
    for name in (
        ONE_SHARD / "train.bin",
        ONE_SHARD / "val.bin",
        ONE_SHARD / "shard.json",
        "meta.json",
        "tokenizer.json",
    ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Re-running into an existing directory replaces it.
    assert tokenize_corpus(cfg, TOKENIZER_CFG, tmp_path / "a") == first
    assert leftovers(tmp_path, keep={"corpus", "a", "b"}) == []


def test_gzip_jsonl_and_globs(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = {"plain.txt": PARAGRAPHS[0], "packed.txt.gz": PARAGRAPHS[1]}
    (corpus / "plain.txt").write_text(texts["plain.txt"])
    with gzip.open(corpus / "packed.txt.gz", "wt", encoding="utf-8", newline="") as fh:
        fh.write(texts["packed.txt.gz"])
    jsonl_docs = [PARAGRAPHS[2], PARAGRAPHS[3], "short one", PARAGRAPHS[0] * 3]
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(jsonl_docs)]
    (corpus / "sub" / "a.jsonl").write_text("\n".join(lines[:2] + ["", json.dumps({"text": ""})]) + "\n")
    with gzip.open(corpus / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines[2:]) + "\n")

    sources = resolve_sources([corpus / "*.txt*", corpus / "sub" / "*.jsonl*"])
    assert [(Path(s.label).name, s.kind, s.compression) for s in sources] == [
        ("packed.txt.gz", "text", "gzip"),
        ("plain.txt", "text", None),
        ("a.jsonl", "jsonl", None),
        ("b.jsonl.gz", "jsonl", "gzip"),
    ]
    expected = [texts["packed.txt.gz"], texts["plain.txt"], *jsonl_docs]
    assert [text for source in sources for text in read_documents(source)] == expected

    out = tmp_path / "tokens"
    meta = tokenize_corpus(corpus_cfg([corpus / "**" / "*.*"], val_fraction=0.4), TOKENIZER_CFG, out)
    assert meta["train_documents"] + meta["val_documents"] == len(expected)
    train, val, _ = load_tokens(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    documents = decoded_documents(everything(train), tokenizer, meta["eot_id"])
    documents += decoded_documents(everything(val), tokenizer, meta["eot_id"])
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
    monkeypatch.setattr(readers, "DOCUMENT_SPLIT_CHARS", 300)
    monkeypatch.setattr(readers, "READ_BLOCK_BYTES", 100)
    text = "".join(PARAGRAPHS * 6)
    (tmp_path / "big.txt").write_text(text, newline="")
    documents = list(read_documents(resolve_sources(tmp_path / "big.txt")[0]))
    assert "".join(documents) == text and len(documents) > 3
    for index, document in enumerate(documents):
        assert len(document) > 300 or index == len(documents) - 1
        assert index == 0 or not document[0].isspace()  # a document starts at text after a blank line
        assert index == len(documents) - 1 or document.endswith("\n")


def test_long_jsonl_document_is_cut_into_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(tok, "PIECE_CHARS", 50)
    text = "".join(PARAGRAPHS) * 3
    batches = list(tk.iter_batches(corpus_module.documents([_jsonl(tmp_path, text)], "text", 0.5, 0)))
    [(split, pieces, ends)] = batches
    assert len(pieces) > 5 and all(len(p) <= 50 for p in pieces) and "".join(pieces) == text
    assert ends == [False] * (len(pieces) - 1) + [True]


def _jsonl(tmp_path: Path, text: str):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    return resolve_sources(tmp_path / "one.jsonl")[0]


def test_given_sentencepiece_style_tokenizer_keeps_exact_ids(tmp_path, monkeypatch):
    """An existing LLM's tokenizer with its own end-of-text token, which marks where a text starts
    (Metaspace, as Llama 2's): documents are encoded whole, so ids equal one encode call each."""
    from tokenizers import SentencePieceBPETokenizer

    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(PARAGRAPHS * 20, vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    spm.save(str(tmp_path / "llama_like.json"))
    given = Tokenizer.from_file(str(tmp_path / "llama_like.json"))
    monkeypatch.setattr(tok, "PIECE_CHARS", 40)  # every document is longer than a piece
    documents = [f"Part {i}. " + "".join(PARAGRAPHS[i % 4 :] + PARAGRAPHS[: i % 4]) for i in range(8)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    # Encoding in pieces would change the ids: the guard is needed.
    assert not tok.exact_cuts(given) and tok.exact_cuts(tok.train_tokenizer(PARAGRAPHS, 300, 1))
    pieced = [i for piece in tok.pieces(documents[0]) for i in given.encode(piece, add_special_tokens=False).ids]
    assert pieced != given.encode(documents[0], add_special_tokens=False).ids

    cfg = corpus_cfg([tmp_path / "docs.jsonl"], val_fraction=0.4)
    with pytest.raises(CorpusError, match="no '<\\|endoftext\\|>' token.*set tokenizer.eot_token"):
        tokenize_corpus(cfg, {"path": str(tmp_path / "llama_like.json")}, tmp_path / "refused")
    meta = tokenize_corpus(cfg, {"path": str(tmp_path / "llama_like.json"), "eot_token": "</s>"}, tmp_path / "t")
    eot = given.token_to_id("</s>")
    train, val, _ = load_tokens(tmp_path / "t")
    for stream, held_out in ((train, False), (val, True)):
        expected = [
            i
            for d in documents
            if split_of_text(d, 0.4) == held_out
            for i in given.encode(d, add_special_tokens=False).ids + [eot]
        ]
        assert everything(stream).tolist() == expected
    assert meta["eot_id"] == eot and meta["train_documents"] and meta["val_documents"]


def split_of_text(text: str, val_fraction: float) -> bool:
    return corpus_module.is_held_out(hashlib.sha256(text.encode()).digest(), 0, val_fraction)
