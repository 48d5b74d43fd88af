"""`upcycling train --spec` refuses a spec that breaks the contract (upcycling.core.spec) with one
`error:` line naming the key and exit 2, before it loads torch or any tokens."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO, run_cli
from upcycling.pipeline.jobs import Inventory
from upcycling.sweep.load import load_sweep


def _spec() -> dict:
    sweep = load_sweep(REPO / "tests" / "configs" / "tiny.yaml", base_dir=REPO, check_corpus=False)
    job = next(job for job in Inventory(sweep, REPO).jobs if job.rule == "dense_final")
    return json.loads(job.params)


def _refused(tmp_path: Path, spec) -> list[str]:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    # torch made absent: the spec is checked before the trainer is imported.
    shadow = tmp_path / "without_torch"
    shadow.mkdir(exist_ok=True)
    (shadow / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {"PYTHONPATH": f"{shadow}:{REPO / 'tests'}"}
    result = run_cli(["train", "--spec", text], cwd=tmp_path, check=False, timeout=120, **env)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "needs torch" not in errors[0] and not (tmp_path / "results").exists()  # nothing trained, nothing written
    return errors


def test_a_spec_with_a_missing_key_exits_2_naming_it(tmp_path):
    spec = _spec()
    del spec["partial"]
    (error,) = _refused(tmp_path, spec)
    assert "key 'partial' is missing" in error and "upcycling train --config" in error


def test_a_spec_with_an_unknown_key_or_a_wrong_type_exits_2_naming_them(tmp_path):
    spec = _spec()
    spec["training"]["lr"] = "fast"
    spec["restart"] = True
    (error,) = _refused(tmp_path, spec)
    assert "key 'training.lr' is \"fast\", expected a number" in error and "key 'restart' is unknown" in error


def test_a_spec_that_is_not_json_exits_2(tmp_path):
    (error,) = _refused(tmp_path, "{job: dense}")
    assert "--spec is not JSON" in error
