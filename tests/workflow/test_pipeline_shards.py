"""A sweep whose corpus is tokenized in 4 shards runs end to end under `snakemake --profile
profiles/local`: the tokenizer job, 4 shard jobs and the gather, then training on the shards as one
stream. Its tokens are the 1-shard tokens, and a rerun finds nothing to do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_sweep import snakemake, write_config
from upcycling.data.tokens import load_tokens

# The tiny sweep cut to one budget per axis: every rule runs, the DAG stays small.
SMALL_SWEEP = {
    "corpus": {"shards": 4},
    "sweep": {"d1_tokens": [8192], "d2_tokens": [8192], "experts": [4], "top_k": [2]},
    "baselines": {"scratch_d_tokens": [8192]},
}


@pytest.fixture(scope="module")
def sharded_pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sharded")
    config = write_config(workdir, SMALL_SWEEP)
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-6000:]
    return workdir, config, result.stdout + result.stderr


def test_four_shard_jobs_and_the_dag_completes(sharded_pipeline):
    workdir, _, log = sharded_pipeline
    results = workdir / "results"
    for rule, count in (("train_tokenizer", 1), ("tokenize_shard", 4), ("tokenize", 1)):
        assert f"rule {rule}:" in log and log.count(f"rule {rule}:") == count, rule
    assert len(list(results.glob("**/metrics.json"))) == 3  # dense, upcycled, scratch
    assert (results / "losses.zarr").is_dir() and (results / "report" / "summary.md").is_file()


def test_sharded_tokens_are_the_one_shard_tokens(sharded_pipeline, tiny_tokens):
    workdir, _, _ = sharded_pipeline
    sharded = workdir / "results" / "tokens"
    meta = json.loads((sharded / "meta.json").read_text())
    reference = json.loads((tiny_tokens / "meta.json").read_text())
    assert len(meta["shards"]) == 4 and len(reference["shards"]) == 1
    assert {k: v for k, v in meta.items() if k != "shards"} == {k: v for k, v in reference.items() if k != "shards"}
    assert (sharded / "tokenizer.json").read_bytes() == (tiny_tokens / "tokenizer.json").read_bytes()
    for got, want in zip(load_tokens(sharded)[:2], load_tokens(tiny_tokens)[:2]):
        assert np.array_equal(got.read(0, len(got)), want.read(0, len(want)))


def test_rerun_has_nothing_to_do(sharded_pipeline):
    workdir, config, _ = sharded_pipeline
    result = snakemake(workdir, config, "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr
