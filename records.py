"""The seq.jsonl line format: one strict Python parser (the reference) and the equivalent regexes that
get_stat.py runs inside polars (the fast path). A line the regex rejects goes through the parser, which
either names what is wrong or proves the line valid (then it is re-serialised canonically)."""
from __future__ import annotations

import json
import re
from typing import Any

from common import data_error

# One record: [user_id, item_id, user_feature, item_feature, action_type, timestamp].
_VALUE = r'(?:-?\d+|"[^"\\]*"|\[\s*(?:-?\d+(?:\s*,\s*-?\d+)*)?\s*\])'
_DICT = r'\{\s*(?:"\d+"\s*:\s*' + _VALUE + r'(?:\s*,\s*"\d+"\s*:\s*' + _VALUE + r')*)?\s*\}'
RECORD_GROUPS_RE = (
    r'\[\s*(-?\d+|"[^"\\]*")\s*,\s*(-?\d+|null)\s*,\s*(' + _DICT + r'|null)\s*,\s*('
    + _DICT + r'|null)\s*,\s*(-?\d+|null)\s*,\s*(-?\d+)\s*\]'
)
RECORD_RE = re.sub(r"\((?!\?)", "(?:", RECORD_GROUPS_RE)  # the same without capture groups
LINE_RE = r"^\s*\[\s*" + RECORD_RE + r"(?:\s*,\s*" + RECORD_RE + r")*\s*\]\s*$"
# Once LINE_RE has validated a whole line, its records are cut out with a looser pattern (dicts as
# "{...}"): the same matches, about a third faster than re-checking every dict's contents.
RECORD_FIELDS_RE = (r'\[\s*(-?\d+|"[^"\\]*")\s*,\s*(-?\d+|null)\s*,\s*(\{[^{}]*\}|null)\s*,\s*(\{[^{}]*\}|null)\s*,'
                    r'\s*(-?\d+|null)\s*,\s*(-?\d+)\s*\]')
RECORD_SPAN_RE = re.sub(r"\((?!\?)", "(?:", RECORD_FIELDS_RE)
# "fid": int  inside a feature dict (strings: cold-start values, handled as padding)
FEATURE_INT_RE = r'"(\d+)"\s*:\s*(-?\d+)'
FEATURE_ARRAY_RE = r'"(\d+)"\s*:\s*\[([^\]]*)\]'
FEATURE_ANY_RE = r'"(\d+)"\s*:\s*(\[[^\]]*\]|-?\d+)'

ACTIONS = (0, 1, 2)
RECORD_HELP = "[user_id, item_id, user_feature, item_feature, action_type, timestamp]"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_features(feats: Any, what: str) -> str | None:
    if not isinstance(feats, dict):
        return f"{what} must be a dict of fid -> value"
    for k, v in feats.items():
        if not k.isdigit():
            return f"{what} has a non-numeric feature id {k!r}"
        ok = _is_int(v) or isinstance(v, str) or (isinstance(v, list) and all(_is_int(x) for x in v))
        if not ok:
            return f"{what} feature {k} has a value of type {type(v).__name__}; expected int, list of ints or string"
    return None


def check_record(rec: Any) -> str | None:
    """None when `rec` is a valid record, else what is wrong with it."""
    if not isinstance(rec, list) or len(rec) != 6:
        n = len(rec) if isinstance(rec, list) else type(rec).__name__
        return f"expected a record of 6 fields {RECORD_HELP}, got {n}"
    user, item, ufeat, ifeat, action, ts = rec
    if not ((_is_int(user) and user > 0) or isinstance(user, str)):
        return f"user_id must be a positive int (or a raw id string), got {user!r}"
    if not _is_int(ts):
        return f"timestamp must be an int (Unix seconds), got {ts!r}"
    if item is None:  # user-profile record
        if ifeat is not None or action is not None:
            return "a profile record (item_id null) must have item_feature and action_type null"
        return None if ufeat is None else _check_features(ufeat, "user_feature")
    if not _is_int(item) or item <= 0:
        return f"item_id must be a positive int, got {item!r}"
    if ufeat is not None:
        return "an interaction record must have user_feature null"
    if action not in ACTIONS or not _is_int(action):
        return f"action_type must be 0, 1 or 2, got {action!r}"
    return None if ifeat is None else _check_features(ifeat, "item_feature")


def parse_line(text: str | bytes, path: str, lineno: int) -> list[list]:
    """json.loads + structural validation; raises DataError naming the file and 1-based line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise data_error(path, lineno, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise data_error(path, lineno, f"empty line; expected a JSON list of records {RECORD_HELP}")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise data_error(path, lineno, f"invalid JSON ({e.msg} at column {e.colno}); the line may be truncated") from None
    if not isinstance(records, list) or not records:
        raise data_error(path, lineno, f"expected a non-empty JSON list of records {RECORD_HELP}")
    for k, rec in enumerate(records):
        err = check_record(rec)
        if err:
            raise data_error(path, lineno, f"record {k}: {err}")
    return records
