"""The lanes and the fixtures they share. A test's lane is its directory, and its markers come from
there (pyproject.toml registers them; README.md lists the lanes and their commands):

- unit/: functions in process, no subprocess and no DeepSpeed engine (analysis tests run without torch);
- integration/: the CLI in subprocesses and the real DeepSpeed engine;
- workflow/: Snakemake end to end (``slow``);
- slurm/: against a local Slurm cluster; gpu/: on a CUDA GPU (each skips, saying why, where it cannot).

Nothing here imports torch or a stage's extra at the top, so that `pytest tests/unit` runs without them.
Each lane is a package (its __init__.py), so lanes may hold files of the same name and
`from slurm.test_slurm import ...` names one file; tests/ is on sys.path (this conftest's directory)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tiny_sweep import REPO, TINY_CONFIG, cli_env, read_json, run_cli, write_config  # noqa: F401 (tests import them from here too)

TESTS = Path(__file__).resolve().parent
LANE_MARKERS = {
    "unit": ("unit",),
    "integration": ("integration",),
    "workflow": ("workflow", "slow"),
    "slurm": ("slurm",),
    "gpu": ("gpu",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        relative = Path(item.path).resolve().relative_to(TESTS)
        lane = relative.parts[0] if len(relative.parts) > 1 else None
        if lane not in LANE_MARKERS:
            raise pytest.UsageError(
                f"tests/{relative} is in no lane: put it in one of tests/{{{','.join(LANE_MARKERS)}}}/ (see tests/conftest.py)"
            )
        for marker in LANE_MARKERS[lane]:
            item.add_marker(marker)
        if item.get_closest_marker("alone") and lane != "slurm":
            raise pytest.UsageError(
                f"{item.nodeid} is marked alone outside tests/slurm/: scripts/test.sh collects `alone` tests "
                "from the Slurm lane only; move it there, or extend that run"
            )


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory) -> Path:
    """Tokens of the tiny corpus, made once per session by `upcycling tokenize`."""
    workdir = tmp_path_factory.mktemp("tokens")
    config = write_config(workdir)
    run_cli(["tokenize", "--config", str(config)], cwd=workdir)
    return workdir / "results" / "tokens"


@pytest.fixture(scope="session")
def make_workdir(tiny_tokens) -> Callable[..., Path]:
    """make_workdir(path, overrides=None, base=TINY_CONFIG): path with config.yaml (the tiny config with
    overrides merged in) and the session's tokens linked in, ready for `upcycling train`."""

    def make(path: Path, overrides: dict | None = None, base: Path = TINY_CONFIG) -> Path:
        (path / "results").mkdir(parents=True)
        write_config(path, overrides, base)
        (path / "results" / "tokens").symlink_to(tiny_tokens)
        return path

    return make


@pytest.fixture
def tiny_workdir(tmp_path, make_workdir) -> Path:
    """A fresh workdir with the tiny config.yaml and the session's tokens linked in."""
    return make_workdir(tmp_path)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """The synthetic study (tests/synthetic_study.py, three second-stage methods) fitted once per
    session: (its directory, the store, the fits read back from its files); read-only for the tests
    that share it. Under pytest-xdist every worker has a session of its own: the first worker to ask
    fits (a minute or more of CPU) under a lock in the workers' shared temporary directory, and the
    others read the same files."""
    from filelock import FileLock

    import synthetic_study as study  # the analysis extra: imported by the tests that fit only
    from upcycling.analysis import fitstage
    from upcycling.analysis import store as results

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's base is one folder of the run's base
        shared = shared.parent
    root = shared / "study"
    with FileLock(str(shared / "study.lock")):
        if not (root / "fitted").is_file():
            root.mkdir(exist_ok=True)
            ds = study.store(root / "losses.zarr", methods=study.METHODS)
            fitstage.fit_all(ds, study.QUICK_FIT, out_dir=root / "fits", workers=2)
            (root / "fitted").touch()  # last: a worker that failed half-way leaves no study to reuse
    return root, results.load_losses(root / "losses.zarr"), fitstage.load_fits(root / "fits")
