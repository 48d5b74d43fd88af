"""Drop-Upcycling's ``sweep.reinit_ratio`` at DAG build (a Snakemake dry run in a subprocess):
a bad r is refused before any job runs, naming the key. The checks without Snakemake:
tests/unit/test_reinit_config.py."""

from __future__ import annotations

from tiny_sweep import snakemake, write_config


def test_snakemake_refuses_a_bad_ratio_at_dag_build(tmp_path):
    config = write_config(tmp_path, {"sweep": {"reinit_ratio": [0, 1.5]}})
    result = snakemake(tmp_path, config, "-n", cores=1, timeout=300)
    assert result.returncode != 0
    assert "sweep.reinit_ratio" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()
