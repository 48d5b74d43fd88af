"""Every error the project raises for bad input reaches the user as one `error: ...` line and exit
status 2, with no traceback: a bad config, a truncated corpus, an unknown job, a spec that is not
JSON, a corrupt export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_sweep import REPO, cli_env, run_cli, write_config
from unit.test_cluster import PAPER


def _one_error_line(result, *phrases: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_a_bad_config(tmp_path):
    config = write_config(tmp_path, {"sweep": {"top_k": [8]}})
    _one_error_line(
        run_cli(["check-config", "--config", str(config)], cwd=tmp_path, check=False),
        "config key 'sweep.top_k'",
        "k <= E",
    )


def test_a_truncated_gzip_corpus(tmp_path):
    text = (REPO / "data/corpus/shakespeare/hamlet.txt.gz").read_bytes()
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(text[: len(text) // 2])
    whole = str(REPO / "data/corpus/shakespeare/macbeth.txt.gz")
    config = write_config(tmp_path, {"corpus": {"paths": [whole, str(broken)]}})
    result = run_cli(["tokenize", "--config", str(config)], cwd=tmp_path, check=False)
    _one_error_line(result, str(broken), "gzip")
    assert not (tmp_path / "results" / "tokens").exists()


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["--family", "dense", "--size", "xs", "--budget", "5"], ["no dense_final job with size=xs, seed=0, d1=5"]),
        (["--family", "upcycled", "--size", "xs", "--budget", "8192"], ["--d1"]),
        (["--spec", "{not json"], ["--spec is not JSON"]),
    ],
)
def test_a_job_that_is_not_in_the_sweep(tiny_workdir, args, phrases):
    result = run_cli(["train", "--config", str(tiny_workdir / "config.yaml"), *args], cwd=tiny_workdir, check=False)
    _one_error_line(result, *phrases)


def test_a_corrupt_export(tmp_path):
    from upcycling.model.export import save_hf
    from upcycling.model.flops import ModelConfig
    from upcycling.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, seq_len=8)
    save_hf(Transformer(cfg).state_dict(), cfg, tmp_path / "dense")
    weights = tmp_path / "dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + bytes(100))  # same size, other bytes
    options = {"experts": 4, "top_k": 2, "granularity": 1, "router_init_std": 0.02}
    spec = {
        "method": "moe_upcycle",
        "options": options,
        "dense": str(tmp_path / "dense"),
        "out": str(tmp_path / "moe"),
        "seed": 0,
        "copy_optimizer_state": False,
    }
    result = run_cli(["transform", "--spec", json.dumps(spec)], cwd=tmp_path, check=False)
    _one_error_line(result, str(weights), "sha256")
    assert not (tmp_path / "moe").exists()


def test_a_stage_whose_extra_is_not_installed(tmp_path):
    """The base install plans a sweep; a stage whose libraries are missing names the extra to install."""
    shadow = tmp_path / "without_lmfit"
    shadow.mkdir()
    (shadow / "lmfit.py").write_text("raise ModuleNotFoundError(\"No module named 'lmfit'\", name='lmfit')\n")
    config = write_config(tmp_path)
    result = run_cli(
        ["fit", "--config", str(config), "--store", str(tmp_path / "losses.zarr"), "--out-dir", str(tmp_path / "fits")],
        cwd=tmp_path,
        check=False,
        PYTHONPATH=str(shadow),
    )
    _one_error_line(result, "needs lmfit", "pip install 'upcycling[analysis]'")


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    """scripts/gpu-check.sh's CPU branch (CI has no GPU): it says why it checks nothing, exits 0 and
    writes nothing."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: scripts/gpu-check.sh would run the whole check")
    out = tmp_path / "gpu-check"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA GPU here" in result.stdout and not out.exists()


def test_plan_cli_on_the_paper_config():
    result = subprocess.run(
        ["upcycling", "plan", "--config", str(PAPER)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "GPU-hours requested" in result.stdout and "dense_stable" in result.stdout


def test_cli_steps_refuse_a_shard_of_another_plan(tmp_path):
    config = write_config(tmp_path, {"corpus": {"shards": 2}})
    result = run_cli(
        ["tokenize-shard", "--config", str(config), "--shard", "00000-of-00004"], cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and "no tokenize_shard job with tokens=tokens, shard=00000-of-00004" in result.stderr
    result = run_cli(["tokenize-gather", "--config", str(config)], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "tokenizer.json does not exist: run the train_tokenizer job" in result.stderr
