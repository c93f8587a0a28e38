"""The JSON sink: one schema for `--json` and `--json-stream`, straight from the Snapshot.

Field names and units are the Snapshot's own (sizes in bytes, times in milliseconds, `time`
in unix seconds); non-finite numbers become null, since JSON has no NaN.
"""

from __future__ import annotations

import json
from typing import Any

from ttt_runtime.protocol import json_data
from xltop.snapshot import Snapshot

SCHEMA_VERSION = 1


def snapshot_to_json(snapshot: Snapshot) -> dict[str, Any]:
    """The Snapshot as plain JSON data (tuples become lists)."""
    return {"schema_version": SCHEMA_VERSION, **json_data(snapshot)}


def snapshot_to_line(snapshot: Snapshot) -> str:
    """One compact JSON line (NDJSON), without the newline."""
    return json.dumps(snapshot_to_json(snapshot), separators=(",", ":"), allow_nan=False)
