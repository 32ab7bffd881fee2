"""Read a JSON object from a file with a one-line error naming the file."""

import json
from pathlib import Path


def read_json_object(path: Path) -> dict:
    """The JSON object stored in ``path``; ``ValueError`` if it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
