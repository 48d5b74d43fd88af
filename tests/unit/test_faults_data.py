"""The tokens stage's faults (issue 22, items 6 and 7): a full disk while a shard is written, a
vocabulary the tokenizer could not reach, a corpus file that changes after planning, token ids
past vocab_size. Each is refused or reported naming the file or key, and leaves nothing partial."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import yaml

# The torch-free unit lane (pytest tests/unit without the train extra) skips this file.
pytest.importorskip("torch")

from tokenizers import Tokenizer

from tiny_sweep import TINY_CONFIG
from unit.test_faults_errors import assert_one_error_line, run_main
from unit.test_tokenize import ONE_SHARD, TOKENIZER_CFG, corpus_cfg, small_corpus
from upcycling.core.errors import InputError
from upcycling.data import tokenize as tk
from upcycling.data.corpus import CorpusError, CorpusOptions, resolve_sources
from upcycling.data.tokenize import TokenFilesError, load_tokens, tokenize_corpus, tokenize_shard

SWEEP_DOCUMENTS = 100  # enough text for the tiny sweep's budgets


def _config(tmp_path, corpus_paths) -> str:
    """The tiny sweep config over these corpus files, its results in tmp_path/results."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg["corpus"]["paths"] = [str(path) for path in corpus_paths]
    cfg["corpus"]["val_fraction"] = 0.3
    cfg["tokenizer"] = {"vocab_size": 300}
    cfg["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# ----------------------------------------------------------------------------- a full disk


class _ShortWrite(np.ndarray):
    """Ids whose tofile writes part of them and fails as numpy does on a full disk."""

    def tofile(self, stream, *args, **kwargs):
        data = self.view(np.ndarray).tobytes()
        stream.write(data[: len(data) // 2])
        stream.flush()
        raise OSError(f"{self.size} requested and {self.size // 2} written")


def test_full_disk_while_a_shard_is_written_is_one_line_and_leaves_no_shard(tmp_path, monkeypatch, capsys):
    corpus = small_corpus(tmp_path / "corpus", documents=SWEEP_DOCUMENTS)
    encode = tk._encode_pipelined

    def encoded_onto_a_full_disk(*args):
        for split, ids, documents, chars in encode(*args):
            yield split, ids.view(_ShortWrite), documents, chars

    monkeypatch.setattr(tk, "_encode_pipelined", encoded_onto_a_full_disk)
    rc, lines = run_main(capsys, "tokenize", "--config", _config(tmp_path, [corpus / "*.txt"]))
    assert rc == 2
    shards = tmp_path / "results" / "tokens" / "shards"  # not the staging directory it was written in
    assert_one_error_line(lines, f"the disk holding {shards} is out of space", "free; shard 00000-of-00001 needs about")
    # Nothing of the tokens (the results directory's lock, if any, is not an output).
    assert not [path.name for path in (tmp_path / "results").glob("*tokens*")]


# ----------------------------------------------------------------------------- the vocabulary


def test_a_vocabulary_the_sample_cannot_reach_is_logged_and_recorded(tmp_path, caplog):
    corpus = small_corpus(tmp_path / "corpus")
    with caplog.at_level(logging.WARNING):
        meta = tokenize_corpus(
            corpus_cfg([corpus / "*.txt"]), {**TOKENIZER_CFG, "vocab_size": 1_000_000}, tmp_path / "tokens"
        )
    reached = Tokenizer.from_file(str(tmp_path / "tokens" / "tokenizer.json")).get_vocab_size()
    assert reached < 1_000_000
    warned = [r.getMessage() for r in caplog.records if "not reached" in r.getMessage()]
    assert any("tokenizer.vocab_size=1000000 not reached" in m and f"gives only {reached} tokens" in m for m in warned)
    # Training reads vocab_size: the tokenizer's own size, so the model's embedding fits every id.
    assert meta["vocab_size"] == reached
    assert meta["vocab_size_requested"] == 1_000_000 and meta["vocab_size_reached"] is False
    assert json.loads((tmp_path / "tokens" / "meta.json").read_text()) == meta


def test_a_reached_vocabulary_is_recorded_without_a_warning(tmp_path, caplog):
    corpus = small_corpus(tmp_path / "corpus")
    with caplog.at_level(logging.WARNING):
        meta = tokenize_corpus(corpus_cfg([corpus / "*.txt"]), TOKENIZER_CFG, tmp_path / "tokens")
    assert meta["vocab_size"] == TOKENIZER_CFG["vocab_size"] == meta["vocab_size_requested"]
    assert meta["vocab_size_reached"] is True
    assert not [r for r in caplog.records if "not reached" in r.getMessage()]


# ----------------------------------------------------------------------------- a corpus that changes


def test_a_corpus_file_that_shrinks_after_planning_is_refused_naming_it(tmp_path, capsys):
    from upcycling.pipeline.jobs import Inventory
    from upcycling.sweep.load import checked_corpora, load_sweep

    corpus = small_corpus(tmp_path / "corpus", documents=SWEEP_DOCUMENTS)
    config = _config(tmp_path, [corpus / "*.txt"])
    sweep = load_sweep(config)
    shard = Inventory(sweep, corpora=checked_corpora(sweep, tmp_path)).find(
        "tokenize_shard", {"tokens": "tokens", "shard": "00000-of-00001"}
    )
    shrunk = corpus / "doc03.txt"
    planned = shrunk.stat().st_size
    shrunk.write_bytes(shrunk.read_bytes()[: planned // 2])  # e.g. a sync still under way
    rc, lines = run_main(capsys, "tokenize-shard", "--spec", json.dumps(shard.spec))
    assert rc == 2
    assert_one_error_line(
        lines,
        f"corpus file {shrunk} changed since the jobs were planned",
        f"has {planned // 2} bytes now, {planned} bytes then",
        "rerun snakemake",
    )
    assert not list((tmp_path / "results").glob("**/*.bin")) and not list((tmp_path / "results").glob("**/.*.tmp"))


def test_a_corpus_file_that_changes_while_it_is_tokenized_leaves_no_shard(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    tokenize_corpus(corpus_cfg([corpus / "*.txt"]), TOKENIZER_CFG, tmp_path / "tokens")
    sources = resolve_sources(corpus / "*.txt")
    sources[2] = dataclasses.replace(sources[2], size=sources[2].size + 7)  # its size when the job began
    out = tmp_path / "again" / ONE_SHARD
    with pytest.raises(CorpusError, match=rf"corpus file {sources[2].label} changed while it was tokenized"):
        tokenize_shard(sources, CorpusOptions.from_config(corpus_cfg([])), tmp_path / "tokens" / "tokenizer.json", out)
    assert not out.exists() and list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- ids past vocab_size


@pytest.fixture
def tokens(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    tokenize_corpus(corpus_cfg([corpus / "*.txt"]), TOKENIZER_CFG, tmp_path / "tokens")
    return tmp_path / "tokens"


def _edit_json(path, **changes):
    payload = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize("recorded", [True, False], ids=["max recorded", "tokens made before the record"])
def test_a_vocab_size_lowered_below_the_ids_is_refused_when_tokens_load(tokens, recorded):
    meta = json.loads((tokens / "meta.json").read_text())
    largest = meta["shards"][0]["max_token_id"]
    assert largest == max(int(np.fromfile(tokens / ONE_SHARD / f"{s}.bin", np.uint16).max()) for s in ("train", "val"))
    if not recorded:  # the one-pass fallback over the memmaps
        meta["shards"][0].pop("max_token_id")
        _edit_json(tokens / ONE_SHARD / "shard.json", max_token_id=None)
    meta["vocab_size"] = largest  # one too few
    (tokens / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TokenFilesError) as refused:
        load_tokens(tokens)
    assert f"{tokens / ONE_SHARD}: token id {largest} is not below meta.json's vocab_size {largest}" in str(
        refused.value
    )
    assert "re-run the tokens stage" in str(refused.value)


def test_an_id_past_vocab_size_written_into_train_bin_is_refused_when_read(tokens):
    train_bin = tokens / ONE_SHARD / "train.bin"
    ids = np.memmap(train_bin, dtype=np.uint16, mode="r+")
    ids[40] = 60_000
    ids.flush()
    train, _, meta = load_tokens(tokens)  # the records still say every id fits: found when read
    with pytest.raises(InputError, match=f"hold id 60000, not below meta.json's vocab_size {meta['vocab_size']}"):
        train.windows(np.array([38]), 5)
    assert train.windows(np.array([100]), 5).max() < meta["vocab_size"]
