"""Faults and bad input that used to end in a traceback: each is now one `error:` line on stderr
naming the thing and the fix, exit 2 (130 for Ctrl-C), and nothing partial left (issue 22, item 6).
The CLI runs in process (``main``); a full or read-only disk is injected as the errno it raises."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from tiny_sweep import REPO, TINY_CONFIG
from upcycling.cli.main import main
from upcycling.core.errors import StorageError, storage_error
from upcycling.sweep.load import ConfigError, sweep_from_mapping


def run_main(capsys, *argv: str) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `upcycling ARGV` in this process."""
    code = main(list(argv))
    return code, capsys.readouterr().err.splitlines()


def assert_one_error_line(lines: list[str], *words: str) -> None:
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


# ----------------------------------------------------------------------------- the errno mapping


def test_storage_error_names_the_disk_the_free_space_and_the_need(tmp_path):
    full = storage_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin")), needed=3 * 10**9)
    assert isinstance(full, StorageError)
    assert f"the disk holding {tmp_path} is out of space" in str(full)
    assert "free; the write needs about 3 GB" in str(full)
    quota = storage_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert "over the disk quota" in str(quota)
    numpy_short = storage_error(OSError("167207 requested and 141312 written"), tmp_path / "shards", 10**6, "shard 1")
    assert f"the disk holding {tmp_path / 'shards'}" in str(numpy_short) and "shard 1 needs about 1 MB" in str(
        numpy_short
    )
    torch_short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4376")
    assert "a write fell short" in str(storage_error(torch_short, tmp_path))
    read_only = storage_error(OSError(errno.EROFS, "Read-only file system", str(tmp_path / "results" / "tokens")))
    assert f"{tmp_path / 'results'} is on a read-only file system" in str(read_only)
    forbidden = storage_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "a")))
    assert f"{tmp_path} is not writable by this user" in str(forbidden)
    # Anything else is not a storage fault and keeps its traceback.
    assert storage_error(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None
    assert storage_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


# ----------------------------------------------------------------------------- the CLI's top level


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """The tiny config with its corpus paths made absolute, in tmp_path."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg["corpus"]["paths"] = [str(REPO / path) for path in cfg["corpus"]["paths"]]
    cfg["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _refuse_writes_under(monkeypatch, root: Path, code: int) -> None:
    """root exists, and every directory made in it fails with ``code`` (as on a read-only mount; we
    run as root, so chmod would not do)."""
    root.mkdir(parents=True, exist_ok=True)
    make_dir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(os.path.abspath(self)).parent.is_relative_to(root):
            raise OSError(code, os.strerror(code), str(self))
        return make_dir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_results_directory_is_one_line_naming_it(tmp_path, tiny_config, monkeypatch, capsys, code):
    pytest.importorskip("tokenizers")
    results = tmp_path / "results"
    _refuse_writes_under(monkeypatch, results, code)
    rc, lines = run_main(capsys, "tokenize", "--config", str(tiny_config))
    assert rc == 2
    assert_one_error_line(lines, f"{results} is", "read-only" if code == errno.EROFS else "not writable", "results_dir")
    assert not [path.name for path in results.iterdir() if "tokens" in path.name]  # no partial tokens


def test_read_only_log_directory_of_a_training_job_is_one_line(tmp_path, monkeypatch, capsys):
    """`upcycling train --history-log` opens its log first: a read-only results directory fails there."""
    logs = tmp_path / "results" / "logs"
    _refuse_writes_under(monkeypatch, tmp_path / "results", errno.EROFS)
    rc, lines = run_main(capsys, "train", "--spec", "{}", "--history-log", str(logs / "job.attempts.log"))
    assert rc == 2
    assert_one_error_line(lines, f"{logs.parent} is on a read-only file system")


def test_ctrl_c_that_reaches_the_top_is_one_line_and_exit_130(tiny_config, monkeypatch, capsys):
    pytest.importorskip("tokenizers")
    from upcycling.data import tokenize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenize, "tokenize_corpus", interrupted)
    rc, lines = run_main(capsys, "tokenize", "--config", str(tiny_config))
    assert rc == 130
    assert_one_error_line(lines, "`upcycling tokenize` interrupted (SIGINT")


def test_spec_with_missing_keys_names_them(capsys):
    pytest.importorskip("tokenizers")
    rc, lines = run_main(capsys, "tokenize-gather", "--spec", json.dumps({"tokens_dir": "results/tokens"}))
    assert rc == 2
    assert_one_error_line(
        lines, "--spec lacks the key '", "(it has 'tokens_dir')", "pass the job's spec as the rules do"
    )
    rc, lines = run_main(capsys, "tokenize-gather", "--spec", "[1, 2]")
    assert rc == 2
    assert_one_error_line(lines, "--spec is a JSON list, not an object")
    # The training job's spec is typed: every missing key is named at once.
    rc, lines = run_main(capsys, "train", "--spec", json.dumps({"run_id": "dense/xs/seed0/d1_8192"}))
    assert rc == 2
    assert_one_error_line(lines, "the training job's spec does not follow the contract", "'family'", "'model'")


# ----------------------------------------------------------------------------- integer keys


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("dense_models", "d_model", 64.0, ["'dense_models.xs.d_model'", "64.0 is not of type 'integer'", "write 64"]),
        ("dense_models", "n_heads", True, ["'dense_models.xs.n_heads'", "True is not of type 'integer'"]),
        ("training", "zero_stage", 1.0, ["'training.zero_stage'", "write 1"]),
        ("sweep", "d1_tokens", [8192.5], ["'sweep.d1_tokens.0'", "give a whole number"]),
    ],
)
def test_a_float_or_boolean_integer_key_is_refused_by_check_config_and_the_dag(
    tmp_path, capsys, section, key, value, words
):
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    (cfg[section]["xs"] if section == "dense_models" else cfg[section])[key] = value
    with pytest.raises(ConfigError) as refused:  # what the Snakefile calls when it builds the DAG
        sweep_from_mapping(cfg, REPO, check_corpus=False)
    for word in words:
        assert word in str(refused.value)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rc, lines = run_main(capsys, "check-config", "--config", str(config), "--workdir", str(REPO))
    assert rc == 2
    assert_one_error_line(lines, *words)


def test_the_typed_sweep_refuses_a_float_that_bypassed_the_schema():
    from upcycling.sweep.settings import DenseModel, _build

    with pytest.raises(ValueError, match=r"config key 'xs.d_model': 64.0 is not an integer"):
        _build(DenseModel, {"d_model": 64.0, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64, "rope_theta": 1e4}, "xs.")


# ----------------------------------------------------------------------------- fits and the store


def _fit_spec() -> str:
    return json.dumps({"fit": {"parameter_counts": "non_embedding", "more_data_never_hurts": False}})


def test_fit_and_report_with_a_missing_store_name_it_and_what_writes_it(tmp_path, capsys):
    pytest.importorskip("xarray")
    store = tmp_path / "results" / "losses.zarr"
    rc, lines = run_main(capsys, "fit", "--spec", _fit_spec(), "--store", str(store), "--out-dir", str(tmp_path / "f"))
    assert rc == 2
    assert_one_error_line(lines, f"--store {store} does not exist", "upcycling aggregate")
    assert not (tmp_path / "f").exists()
    rc, lines = run_main(
        capsys, "report", "--store", str(store), "--fits", str(tmp_path), "--out-dir", str(tmp_path / "r")
    )
    assert rc == 2
    assert_one_error_line(lines, f"--store {store} does not exist", "upcycling aggregate")
    store.mkdir(parents=True)  # a directory that is no zarr store
    rc, lines = run_main(capsys, "fit", "--spec", _fit_spec(), "--store", str(store), "--out-dir", str(tmp_path / "f"))
    assert rc == 2
    assert_one_error_line(lines, f"--store {store} is not a results store")


@pytest.mark.parametrize("text", ['{"key": "scaling", "params": {"A": 1.', "[]"])
def test_a_cut_or_foreign_fit_json_names_the_file_and_says_to_rerun_fit(tmp_path, capsys, text):
    pytest.importorskip("xarray")
    fits = tmp_path / "fits"
    fits.mkdir()
    (fits / "scaling.json").write_text(text)
    rc, lines = run_main(
        capsys,
        "predict",
        "--fits",
        str(fits),
        "--n1",
        "1e8",
        "--d1",
        "1e9",
        "--d2",
        "1e9",
        "--experts",
        "8",
        "--top-k",
        "2",
    )
    assert rc == 2
    assert_one_error_line(lines, f"{fits / 'scaling.json'} is not a readable fit", "rerun `upcycling fit`")


# ----------------------------------------------------------------------------- preflight (item 10)


def test_preflight_names_tokenizer_threads_and_the_model_size_of_a_cpu_job():
    from unit.test_cluster import PAPER, _sweep
    from upcycling.cluster.preflight import Cluster, Node, Partition, problems
    from upcycling.pipeline.jobs import Inventory

    small = Cluster(
        partitions={"cpu": Partition("cpu", ("n1",), float("inf"), default=True)}, nodes={"n1": Node("n1", 4, 64000, 0)}
    )
    sweep = _sweep(PAPER, gpus_per_job=0)
    sweep = type(sweep).from_mapping({**sweep.mapping, "tokenizer": {**sweep.mapping["tokenizer"], "threads": 8}})
    found = problems(Inventory(sweep), small)
    cpus = [line for line in found if "CPUs per node" in line]
    assert cpus and all(line.startswith("tokenizer.threads: ") for line in cpus if "tokenize" in line.split(":")[1])
    assert any(line.startswith("tokenizer.threads: tokenize_shard jobs ask 8 CPUs") for line in cpus)
    assert not any("slurm.cpu_threads" in line and "tokeniz" in line for line in found)
    memory = [line for line in found if "MB per node" in line and "_stable jobs" in line]
    assert memory, found
    for line in memory:
        assert line.startswith("dense_models.") and "slurm.gpus_per_job is 0" in line
        assert "make dense_models." in line and "smaller" in line and "spread" not in line


# ----------------------------------------------------------------------------- implausible metrics (item 7)


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("final_val_loss", lambda payload: payload.update(final_val_loss=-3.0)),
        ("curve.val_loss[1]", lambda payload: payload["curve"]["val_loss"].__setitem__(1, float("inf"))),
        ("train_curve.loss[0]", lambda payload: payload.update(train_curve={"tokens": [256], "loss": [float("nan")]})),
    ],
)
def test_the_store_refuses_a_negative_or_non_finite_loss_naming_file_and_field(tmp_path, field, edit):
    pytest.importorskip("xarray")
    from unit.test_results import coords, write_metrics
    from upcycling.analysis.store import aggregate
    from upcycling.core.metrics import MetricsError

    good = write_metrics(tmp_path, coords("xs", "dense", 8192, 0), 3.1, n1=10, n2=10, n_total=20, tokens=8192)
    bad = write_metrics(tmp_path, coords("s", "dense", 8192, 0), 3.0, n1=20, n2=20, n_total=40, tokens=8192)
    payload = json.loads(bad.read_text())
    edit(payload)
    bad.write_text(json.dumps(payload))  # Python's json writes NaN and Infinity; a hand edit can too
    store = tmp_path / "losses.zarr"
    with pytest.raises(MetricsError) as refused:
        aggregate([good, bad], store, config_text="", code_version="test")
    assert f"{bad}: {field} is " in str(refused.value) and "a finite number >= 0" in str(refused.value)
    assert not store.exists()
