"""Atomic publication: a directory appears whole or not at all, replaces the old one whole, and is
as readable as any directory the user creates (the umask's mode, not mkdtemp's 0700)."""

from __future__ import annotations

import os
import stat

import pytest

from upcycling.core.publish import publish_json, sha256_file, staging_dir


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_staged_directory_replaces_the_old_one_with_the_umask_mode(tmp_path):
    final = tmp_path / "out" / "run"
    with staging_dir(final) as staged:
        (staged / "a.txt").write_text("old")
    with staging_dir(final) as staged:
        (staged / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["run"]  # nothing staged or set aside left
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~_umask()


def test_a_published_file_replaces_the_old_one_with_the_umask_mode(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    publish_json(path, {"loss": 1.0})
    publish_json(path, {"loss": 2.0})
    assert path.read_text() == '{\n "loss": 2.0\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    with pytest.raises(ValueError):
        publish_json(path, {"loss": float("nan")})  # strict JSON: refused before anything is written
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_a_failure_while_staging_leaves_the_old_directory_and_no_temporary(tmp_path):
    final = tmp_path / "run"
    with staging_dir(final) as staged:
        (staged / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), staging_dir(final) as staged:
        (staged / "partial.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (final / "a.txt").read_text() == "old"


def test_sha256_file_matches_hashlib_across_blocks(tmp_path):
    import hashlib

    data = os.urandom(3000)
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin", block=1024) == hashlib.sha256(data).hexdigest()
