"""One JSON-object-per-line parser for every JSONL file the project reads (data, cached answers, metrics)."""

from __future__ import annotations

import json
from typing import Any


def parse_json_object(line: str, where: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """``line`` as a dict; ``error`` names ``where`` (``file:line``) for malformed JSON or a non-object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record
