"""The tokens directory's shape: the shard plan, the paths the rules write, the jobs' estimates,
the multi-shard stream, and the config checks of the corpus."""

from __future__ import annotations

import numpy as np
import pytest

# The torch-free unit lane (pytest tests/unit without the train extra) skips this file.
pytest.importorskip("torch")

import yaml

from tiny_sweep import REPO, write_config
from upcycling.data import tokens
from upcycling.data.windows import TokenStream, TokenWindows
from upcycling.sweep.load import ConfigError, load_sweep


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8])
def test_shard_plan_is_contiguous_whole_files_and_balanced(shards):
    rng = np.random.default_rng(shards)
    sizes = rng.integers(1_000, 100_000, size=8).tolist()
    plan = tokens.shard_plan(sizes, shards)
    assert len(plan) == shards and all(len(files) >= 1 for files in plan)
    assert [i for files in plan for i in files] == list(range(8))  # every file once, in order
    # No shard exceeds its fair share by more than one file.
    fair = sum(sizes) / shards
    assert all(sum(sizes[i] for i in files) <= fair + max(sizes) for files in plan)
    assert tokens.shard_plan(sizes, shards) == plan  # a function of sizes and count only


def test_shard_plan_balances_by_bytes_not_by_count():
    plan = tokens.shard_plan([100, 1, 1, 1, 1, 100], 2)
    assert plan == [range(0, 3), range(3, 6)]
    assert tokens.shard_plan([1000, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert tokens.shard_plan([1, 1, 1, 1000], 3) == [range(0, 2), range(2, 3), range(3, 4)]  # the big file alone
    with pytest.raises(ValueError, match="5 shards cannot split 4 files"):
        tokens.shard_plan([1, 1, 1, 1], 5)


def test_shard_names_and_outputs(tmp_path):
    assert tokens.shard_name(2, 16) == "00002-of-00016"
    outputs = tokens.tokens_outputs(tmp_path, 2)
    assert outputs["train_tokenizer"] == [tmp_path / "tokenizer.json"]
    assert outputs["tokenize"] == [tmp_path / "meta.json"]
    assert [p.relative_to(tmp_path).as_posix() for p in outputs["tokenize_shard"]] == [
        f"shards/{name}/{f}" for name in ("00000-of-00002", "00001-of-00002") for f in tokens.SHARD_FILES
    ]


def test_runtime_estimate_scales_with_bytes_and_cores():
    one = tokens.estimate_tokenize_seconds(1e9, 1)
    assert tokens.estimate_tokenize_seconds(2e9, 1) == pytest.approx(2 * one)
    sixteen = tokens.estimate_tokenize_seconds(1e9, 16)
    assert one / 16 < sixteen < one / 8  # parallel, but not perfectly
    slower = tokens.estimate_tokenize_seconds(1e9, 1, tokens_per_s_per_core=tokens.TOKENS_PER_S_PER_CORE / 2)
    assert slower > 1.5 * one


def test_tokenize_jobs_cover_every_output_with_estimates(tmp_path):
    cfg = {
        "corpus": {"shards": 3},
        "tokenizer": {"threads": 4, "sample_bytes": 10**8},
        "slurm": {"runtime_margin": 2.0, "startup_minutes": 5},
    }
    labels = [f"c/{i}.jsonl.zst" for i in range(6)]
    sizes, text_bytes = [10**9] * 6, [4 * 10**9] * 6
    jobs = tokens.tokenize_jobs(cfg, tmp_path, labels, sizes, text_bytes)
    assert [job.rule for job in jobs] == ["train_tokenizer"] + ["tokenize_shard"] * 3 + ["tokenize"]
    written = sorted(p for job in jobs for p in job.outputs)
    assert written == sorted(p for paths in tokens.tokens_outputs(tmp_path, 3).values() for p in paths)
    shard_jobs = jobs[1:4]
    assert [job.files for job in shard_jobs] == [labels[0:2], labels[2:4], labels[4:6]]
    assert all(job.text_bytes == 8 * 10**9 and job.cpus == 4 for job in shard_jobs)
    assert shard_jobs[0].seconds == pytest.approx(tokens.estimate_tokenize_seconds(8e9, 4))
    assert jobs[0].text_bytes == 10**8  # the sample, not the corpus
    resources = tokens.slurm_resources(shard_jobs[0], cfg)
    assert resources["runtime"] == int(np.ceil(shard_jobs[0].seconds * 2.0 / 60 + 5))
    assert resources["cpus_per_task"] == 4 and resources["mem_mb"] == tokens.TOKENIZE_MEM_MB
    # A given tokenizer is only copied.
    given = tokens.tokenize_jobs({**cfg, "tokenizer": {"path": "t.json"}}, tmp_path, labels, sizes, text_bytes)
    assert given[0].text_bytes == 0 and given[0].seconds < 60


def test_token_stream_reads_across_parts():
    full = np.arange(100, dtype=np.uint16)
    stream = TokenStream([full[:30], full[30:30], full[30:31], full[31:100]])  # an empty part is skipped
    assert len(stream) == 100 and len(stream.parts) == 3
    for begin, end in [(0, 100), (25, 35), (30, 31), (29, 32), (99, 100), (40, 40)]:
        assert stream.read(begin, end).tolist() == full[begin:end].tolist()
    starts = np.array([0, 28, 29, 30, 60, 89])
    assert np.array_equal(stream.windows(starts, 11), TokenStream([full]).windows(starts, 11))
    with pytest.raises(IndexError):
        stream.read(95, 101)
    windows = TokenWindows(stream, 8)
    assert (
        TokenWindows(full, 8).train_batch(1, 2, 4, slice(0, 4))[0].tolist()
        == windows.train_batch(1, 2, 4, slice(0, 4))[0].tolist()
    )


def test_config_checks_the_corpus_before_anything_runs(tmp_path):
    config = write_config(tmp_path, {"corpus": {"shards": 7}})
    with pytest.raises(ConfigError, match="'corpus.shards': 7 shards, but corpus.paths names 6 files"):
        load_sweep(config)
    (tmp_path / "c.jsonl.xz").write_bytes(b"x")
    config = write_config(tmp_path, {"corpus": {"paths": [str(tmp_path / "c.jsonl.xz")]}})
    with pytest.raises(ConfigError, match=r"'corpus.paths': .*c.jsonl.xz: '.xz' files cannot be read"):
        load_sweep(config)
    sweep = load_sweep(write_config(tmp_path))
    assert sweep.corpus.shards == 1 and sweep.tokenizer.sample_bytes == 10**9
    assert sweep.tokenizer.tokens_per_s_per_core == tokens.TOKENS_PER_S_PER_CORE
    assert sweep.tokenizer.bytes_per_token == tokens.BYTES_PER_TOKEN


def test_paper_corpus_section_reads_a_slimpajama_layout(tmp_path):
    """config/paper.yaml's corpus section on a miniature SlimPajama: chunk directories of
    example_train_<n>.jsonl.zst files, mixed RedPajama sources, only CommonCrawl kept."""
    import json

    import zstandard

    from upcycling.data.tokenize import tokenize_corpus

    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    root = tmp_path / "SlimPajama-627B"
    kept = []
    for chunk in (1, 2):
        (root / "train" / f"chunk{chunk}").mkdir(parents=True)
        for n in range(3):
            rows = []
            for i in range(6):
                name = ["RedPajamaCommonCrawl", "RedPajamaGithub", "RedPajamaC4"][i % 3]
                text = f"Document {chunk}-{n}-{i} from {name}. " + "Some words of web text, again. " * (i + 1)
                rows.append({"text": text, "meta": {"redpajama_set_name": name}})
                kept += [text] if name == "RedPajamaCommonCrawl" else []
            data = "".join(json.dumps(row) + "\n" for row in rows).encode()
            (root / "train" / f"chunk{chunk}" / f"example_train_{n}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor().compress(data)
            )
    corpus = dict(paper["corpus"], shards=3, val_fraction=0.25)
    corpus["paths"] = [p.replace("/data/SlimPajama-627B", str(root)) for p in corpus["paths"]]
    meta = tokenize_corpus(corpus, {"vocab_size": 300}, tmp_path / "tokens")
    assert meta["train_documents"] + meta["val_documents"] == len(kept) == 12
    assert len(meta["sources"]) == 6 and len(meta["shards"]) == 3
    assert meta["select"] == {"meta.redpajama_set_name": ["RedPajamaCommonCrawl"]}
