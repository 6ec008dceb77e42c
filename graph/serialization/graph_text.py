"""The graph spec as JSON text: one strict reader for every format, and the canonical bytes its digest is taken of.

The reader refuses what ``json.loads`` would quietly accept: duplicate keys (the last one would win), ``NaN`` and
``Infinity`` literals (non-finite floats are stored as ``{"$float": "nan"}``), and it turns every parse failure,
including integers too long to convert and nesting too deep to follow, into a :class:`FileFormatError`.
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import FileFormatError


def canonical_graph(spec: Any) -> bytes:
    """The compact UTF-8 JSON of a spec (keys in their order): what ``.vnmodel`` and ``.pkl`` store and what the
    ``.json`` format's graph digest is taken of, so re-indenting a ``.json`` file keeps its digest."""
    return json.dumps(spec, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def parse_json(raw: bytes | str, what: str) -> Any:
    """Parse JSON text strictly; :class:`FileFormatError` naming ``what`` and the position for anything malformed."""
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise FileFormatError(f"{what} is not UTF-8 text (byte {error.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        ending = "truncated" if error.pos >= len(text.rstrip()) else "corrupted"
        raise FileFormatError(f"{what}: {ending} JSON at line {error.lineno}, column {error.colno}: "
                              f"{error.msg}") from None
    except RecursionError:
        raise FileFormatError(f"{what}: the JSON is nested too deeply") from None
    except FileFormatError as error:
        raise FileFormatError(f"{what}: {error}") from None
    except ValueError as error:  # int() refusing more than sys.get_int_max_str_digits() digits
        raise FileFormatError(f"{what}: {error}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise FileFormatError(f"the key {duplicate[:80]!r} appears twice in one JSON object")
    return result


def _no_constant(name: str) -> Any:
    raise FileFormatError(f"the JSON literal {name} is not allowed (non-finite floats are stored as $float)")
