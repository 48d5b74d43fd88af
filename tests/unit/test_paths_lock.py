"""Where the results live is not part of any job's identity (path-free specs, inputs relative to the
working directory), and one lock per results directory names its holder and how to clear it."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml

from tiny_sweep import REPO, TINY_CONFIG, merge_sections
from upcycling.core import lock
from upcycling.pipeline.jobs import Inventory
from upcycling.sweep.load import sweep_from_mapping


def inventory(base: Path, results_dir: str, **changes) -> Inventory:
    """The tiny sweep planned from ``base`` (the working directory and where the corpus starts)."""
    cfg = merge_sections(yaml.safe_load(TINY_CONFIG.read_text()), changes)
    cfg["results_dir"] = results_dir
    return Inventory(sweep_from_mapping(cfg, base, check_corpus=False), base)


def params(inv: Inventory) -> dict[str, str]:
    return {job.label: job.params for job in inv.jobs}


def test_specs_are_the_same_wherever_the_project_and_its_results_live(tmp_path, monkeypatch):
    """Two copies of a checkout (the corpus inside each), results relative or absolute: every job's
    params are equal, and the corpus inputs are relative to the working directory."""
    places = []
    for name in ("a", "b b"):
        root = tmp_path / name
        for path in yaml.safe_load(TINY_CONFIG.read_text())["corpus"]["paths"]:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes((REPO / path).read_bytes())
        places.append(root)
    monkeypatch.chdir(places[0])
    first = inventory(places[0], "results")
    monkeypatch.chdir(places[1])
    second = inventory(places[1], str(places[1] / "elsewhere" / "results"))
    assert params(first) == params(second)
    for job in (*first.jobs, *second.jobs):
        assert str(tmp_path) not in job.params, job.label
    tokenizer = first.find("train_tokenizer", {})
    assert all(not os.path.isabs(path) and path.startswith("data/") for path in tokenizer.inputs.values())


def test_a_corpus_outside_the_working_directory_is_named_by_its_real_path(tmp_path, monkeypatch):
    link = tmp_path / "repo-link"
    link.symlink_to(REPO)
    monkeypatch.chdir(tmp_path)
    inputs = inventory(link, "results").find("train_tokenizer", {}).inputs.values()
    assert all(path.startswith(os.path.realpath(REPO) + "/") for path in inputs)


def test_sharding_and_tokenizer_threads_change_no_training_or_aggregate_spec(monkeypatch):
    monkeypatch.chdir(REPO)
    base = params(inventory(REPO, "results"))
    for changed in (
        inventory(REPO, "results", corpus={"shards": 2}),
        inventory(REPO, "results", tokenizer={"threads": 7}),
    ):
        now = params(changed)
        kept = [label for label in base if not label.startswith(("tokenize", "train_tokenizer"))]
        assert all(now[label] == base[label] for label in kept)
        assert now["tokenize[tokens=tokens]"] is not None


# ----------------------------------------------------------------------------- the lock


def test_a_second_lock_stops_with_the_holder_and_how_to_clear_it(tmp_path):
    results = tmp_path / "my results"
    with lock.ResultsLock(results, "snakemake --cores 2"):
        with pytest.raises(lock.ResultsLocked) as refused:
            lock.ResultsLock(results, "upcycling train").acquire()
        message = str(refused.value)
        for part in ("snakemake --cores 2", f"pid {os.getpid()}", socket.gethostname(), "started", "upcycling unlock"):
            assert part in message
        with pytest.raises(lock.ResultsLocked, match="held by a running process"):
            lock.unlock(results)  # never while its holder runs
    lock.ResultsLock(results, "the next run").acquire().release()  # released: free again
    assert "removed the lock" in lock.unlock(results) and not lock.lock_path(results).exists()


def test_jobs_of_the_driver_inherit_its_lock(tmp_path, monkeypatch):
    monkeypatch.delenv(lock.HELD_ENV, raising=False)
    results = tmp_path / "results"
    driver = lock.ResultsLock(results, "snakemake").acquire()
    try:
        monkeypatch.setenv(lock.HELD_ENV, "")
        lock.mark_held(results)  # what the driver's onstart does; its jobs inherit the variable
        with lock.results_locked(results, "upcycling train"):  # no deadlock against the driver
            pass
        monkeypatch.delenv(lock.HELD_ENV)
        with pytest.raises(lock.ResultsLocked), lock.results_locked(results, "upcycling clean"):
            pass
    finally:
        driver.release()


def test_a_stale_holder_is_named_and_cleared(tmp_path):
    """A lock file left by a process that is gone (kill -9 on a file system without flock): its
    holder is shown, and unlock removes it."""
    results = tmp_path / "results"
    results.mkdir()
    gone = {"host": socket.gethostname(), "pid": 2**22 + 12345, "started": "yesterday", "command": "snakemake"}
    lock.lock_path(results).write_text(json.dumps(gone))
    assert lock.read_holder(lock.lock_path(results)).pid == gone["pid"]
    assert "removed the lock" in lock.unlock(results)
    with lock.ResultsLock(results, "now"):  # and the next run takes it
        assert lock.read_holder(lock.lock_path(results)).command == "now"
