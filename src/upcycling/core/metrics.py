"""The metrics record of one run: its JSON schema, written against by the trainer and validated by
the aggregate (``schemas/metrics.schema.json``; docs/contracts.md documents it, checked by a test).
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema

from upcycling import __version__
from upcycling.core.errors import InputError

SCHEMA_PATH = Path(str(files("upcycling") / "schemas" / "metrics.schema.json"))
FORMAT_VERSION = 2


class MetricsError(InputError):
    """A metrics JSON that does not follow the contract; the message names the file and the key."""


@cache
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def problems(record: Any) -> list[str]:
    """Every way ``record`` breaks the schema, as 'key: message' lines (empty when it is valid)."""
    validator = jsonschema.Draft202012Validator(schema())
    found = sorted(validator.iter_errors(record), key=lambda error: list(error.absolute_path))
    return [f"{'.'.join(map(str, error.absolute_path)) or '<top level>'}: {error.message}" for error in found]


def validate(record: Any, where: str) -> dict:
    """``record`` itself when it follows the schema; MetricsError naming ``where`` and the keys."""
    found = problems(record)
    if found:
        raise MetricsError(
            f"{where}: not a metrics record of format {FORMAT_VERSION} ({'; '.join(found[:5])}): "
            "rerun the job that writes it (upcycling train)"
        )
    return record


def code_version() -> str:
    """Package version plus the git commit, when the code runs from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+git{commit}" if commit else __version__
