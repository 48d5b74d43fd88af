"""A sweep whose corpus is tokenized in 4 shards runs end to end under `snakemake --profile
profiles/local` (the tokenizer job, 4 shard jobs and the gather, then training on the shards as one
stream; its tokens are the 1-shard tokens), and its results do not depend on where the project
lives: the finished sweep, moved with its results and .snakemake/, reached through a symlinked
Snakefile path, or with its results copied elsewhere (`cp -a`, results_dir pointing at the copy),
plans nothing; a copied store's metrics are accepted by aggregate; changing how the corpus is
sharded or the tokenizer's thread count retrains nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tiny_sweep import REPO, TINY_CONFIG, cli_env, merge_sections
from upcycling.data.tokens import load_tokens

# The tiny sweep cut to one budget per axis, its corpus in 4 shards: every rule runs, the DAG stays small.
SMALL_SWEEP = {
    "corpus": {"shards": 4},
    "sweep": {"d1_tokens": [8192], "d2_tokens": [8192], "experts": [4], "top_k": [2]},
    "baselines": {"scratch_d_tokens": [8192]},
}
NOTHING = "Nothing to be done"


def checkout(root: Path) -> Path:
    """A checkout of the workflow (Snakefile, rules, envs, profile, the tiny corpus) with a config
    whose corpus and results paths are relative, as the repository's own config is."""
    root.mkdir(parents=True)
    for part in ("Snakefile", "workflow", "envs", "config"):
        source = REPO / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / part)
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    for path in cfg["corpus"]["paths"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, root / path)
    merge_sections(cfg, SMALL_SWEEP)
    cfg["results_dir"] = "results"
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def snakemake(snakefile: Path, workdir: Path, *args: str, config: Path | None = None):
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir)]
    command += ["--profile", str(REPO / "profiles" / "local"), "--cores", "2"]
    if config is not None:
        command += ["--configfile", str(config)]
    return subprocess.run([*command, *args], cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=600)


def planned(result) -> str:
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def with_changes(root: Path, name: str, **sections) -> Path:
    cfg = merge_sections(yaml.safe_load((root / "config" / "config.yaml").read_text()), sections)
    path = root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    """The sweep run once in its checkout: (the checkout, snakemake's log)."""
    root = checkout(tmp_path_factory.mktemp("relocate") / "first place")
    result = snakemake(root / "Snakefile", root)
    assert result.returncode == 0, result.stderr[-6000:]
    return root, result.stdout + result.stderr


@pytest.fixture(scope="module")
def finished(first_run) -> Path:
    return first_run[0]


def test_four_shard_jobs_and_the_dag_completes(first_run):
    root, log = first_run
    results = root / "results"
    for rule, count in (("train_tokenizer", 1), ("tokenize_shard", 4), ("tokenize", 1)):
        assert log.count(f"rule {rule}:") == count, rule
    assert len(list(results.glob("**/metrics.json"))) == 3  # dense, upcycled, scratch
    assert (results / "losses.zarr").is_dir() and (results / "report" / "summary.md").is_file()
    assert NOTHING in planned(snakemake(root / "Snakefile", root, "-n"))


def test_sharded_tokens_are_the_one_shard_tokens(finished, tiny_tokens):
    sharded = finished / "results" / "tokens"
    meta = json.loads((sharded / "meta.json").read_text())
    reference = json.loads((tiny_tokens / "meta.json").read_text())
    assert len(meta["shards"]) == 4 and len(reference["shards"]) == 1
    # The same corpus files (the reference names them by absolute paths, this checkout by relative ones).
    assert [Path(path).name for path in meta["sources"]] == [Path(path).name for path in reference["sources"]]
    unplaced = ("shards", "sources")
    assert {k: v for k, v in meta.items() if k not in unplaced} == {
        k: v for k, v in reference.items() if k not in unplaced
    }
    assert (sharded / "tokenizer.json").read_bytes() == (tiny_tokens / "tokenizer.json").read_bytes()
    for got, want in zip(load_tokens(sharded)[:2], load_tokens(tiny_tokens)[:2]):
        assert np.array_equal(got.read(0, len(got)), want.read(0, len(want)))


def test_a_moved_checkout_plans_nothing(finished, tmp_path):
    moved = tmp_path / "second place"
    shutil.copytree(finished, moved, symlinks=True)
    assert NOTHING in planned(snakemake(moved / "Snakefile", moved, "-n"))
    # The same checkout reached through a link (a home directory reached by two paths).
    link = tmp_path / "link"
    link.symlink_to(moved)
    assert NOTHING in planned(snakemake(link / "Snakefile", moved, "-n"))


def test_copied_results_are_accepted_and_kept(finished, tmp_path):
    copy = tmp_path / "copy" / "results"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(finished / "results"), str(copy)], check=True)
    config = with_changes(finished, "copied.yaml", results_dir=str(copy))
    assert NOTHING in planned(snakemake(finished / "Snakefile", finished, "-n", config=config))
    metrics = sorted(copy.glob("**/metrics.json"))
    before = {path: path.read_bytes() for path in metrics}
    result = snakemake(
        finished / "Snakefile", finished, "--forcerun", "aggregate", "--until", "aggregate", config=config
    )
    assert result.returncode == 0, result.stderr[-4000:]  # the copy's metrics are the current settings'
    assert (copy / "losses.zarr").is_dir()
    assert {path: path.read_bytes() for path in metrics} == before and len(metrics) == 3


def test_settings_that_change_no_result_retrain_nothing(finished):
    threads = with_changes(finished, "threads.yaml", tokenizer={"threads": 1})
    assert NOTHING in planned(snakemake(finished / "Snakefile", finished, "-n", config=threads))
    shards = with_changes(finished, "shards.yaml", corpus={"shards": 2})
    plan = planned(snakemake(finished / "Snakefile", finished, "-n", config=shards))
    jobs = {line.split()[1].rstrip(":") for line in plan.splitlines() if line.startswith(("rule ", "localrule "))}
    assert jobs == {"tokenize_shard", "tokenize"}, plan[-3000:]  # the same tokens: no training job reruns
