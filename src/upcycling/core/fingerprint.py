"""A result's identity: the sha256 of the canonical JSON of what produced it.

Every job's spec, every checkpoint's manifest and the tokens' sidecar are fingerprinted the same
way, so the trainer checks an upstream with the very function the planner used to name it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(payload: Any) -> str:
    """Sorted keys, no spaces: the one spelling of a payload (Snakemake params use it too)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def fingerprint(payload: Any) -> str:
    """sha256 of the canonical JSON of ``payload``."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
