"""A results_dir with a space, a quote and a non-ASCII letter works in every rule (every path of every
shell command quoted, logs included), and a second snakemake on a results directory in use stops at
once, naming the holder, with nothing of the first run touched."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess

import pytest
import yaml

from tiny_sweep import snakemake, write_config
from upcycling.core.lock import ResultsLock

ODD = "runs/my sweep's ü"
PATH_FLAGS = ("--results", "--history-log", "--store", "--fits", ">>")


def odd_config(workdir):
    config = write_config(workdir)
    cfg = yaml.safe_load(config.read_text())
    cfg["results_dir"] = ODD
    config.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return config


def test_every_rules_command_quotes_its_paths(tmp_path):
    config = odd_config(tmp_path)
    result = snakemake(tmp_path, config, "-n", "--printshellcmds", "--forceall")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = (result.stdout + result.stderr).splitlines()
    commands = [line.partition(": ")[2] for line in shown if line.startswith("Shell command: ") and "upcycling" in line]
    named = {word for command in commands for word in shlex.split(command) if word.startswith("upcycling")}
    assert len(commands) >= 13, result.stdout[-2000:]  # one per job of the tiny sweep
    for command in commands:
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command  # the shell parses it
        words = shlex.split(command)
        for flag in PATH_FLAGS:
            for index, word in enumerate(words[:-1]):
                if word == flag:
                    assert words[index + 1].startswith(ODD), (flag, command)
        assert ">>" in words, command  # every job logs
    assert named == {"upcycling"}


@pytest.mark.slow  # three jobs through snakemake
def test_tokens_rules_run_in_an_odd_results_dir(tmp_path):
    config = odd_config(tmp_path)
    result = snakemake(tmp_path, config, "--until", "tokenize")
    assert result.returncode == 0, result.stderr[-4000:]
    results = tmp_path / ODD
    assert (results / "tokens" / "meta.json").is_file()
    assert "tokens:" in (results / "logs" / "tokens" / "gather.log").read_text()  # the log went where named
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snakemake", "config.yaml", "runs"]  # no stray file

    # SIGINT to snakemake alone lets the running job finish but leaves its outputs marked incomplete
    # (Snakemake's file-backed mark, as it writes it); complete outputs are not redone (the profile's
    # ignore-incomplete: every output is published whole).
    mark = base64.urlsafe_b64encode(f"{ODD}/tokens/meta.json".encode()).decode()
    (tmp_path / ".snakemake" / "incomplete" / mark).write_text(json.dumps({"external_jobid": None}))
    again = snakemake(tmp_path, config, "-n", "--until", "tokenize")
    planned = [line for line in again.stdout.splitlines() if line.startswith(("rule ", "localrule "))]
    assert again.returncode == 0 and not planned, again.stdout[-2000:]


def test_a_second_run_on_results_in_use_stops_at_once(tmp_path):
    config = odd_config(tmp_path)
    results = tmp_path / ODD
    held = ResultsLock(results, "snakemake --profile profiles/slurm").acquire()  # the first run
    try:
        (results / "kept.txt").write_text("the first run's output")
        result = snakemake(tmp_path, config, "--until", "tokenize")
    finally:
        held.release()
    assert result.returncode != 0
    assert "is in use by 'snakemake --profile profiles/slurm'" in result.stderr
    assert "upcycling unlock" in result.stderr
    assert not (results / "tokens").exists()  # no job ran
    assert (results / "kept.txt").read_text() == "the first run's output"
