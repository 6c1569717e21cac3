"""The seq.jsonl line format: one strict parser, the reference (json.loads + check_record), and the fast one
(msgspec's typed decoding, several times faster) that returns the same records. The fast parser vouches only
for what its types and checks prove; any line it cannot read goes to the strict parser, which names what is
wrong or returns the records (a valid line the fast types do not cover: a lone surrogate, an int beyond 64
bits, a BOM)."""
from __future__ import annotations

import json
from typing import Annotated, Any, Optional, Union

import msgspec

from common import data_error

# One record: [user_id, item_id, user_feature, item_feature, action_type, timestamp]. The types say what
# check_record says about each field alone; shape_ok adds what depends on several fields.
_INT64 = Annotated[int, msgspec.Meta(ge=-2**63, le=2**63 - 1)]
_ID = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
_ACTION = Annotated[int, msgspec.Meta(ge=0, le=2)]
FEATURES = dict[str, Union[_INT64, str, list[_INT64]]]
_RECORD = tuple[Union[_ID, str], Optional[_ID], Optional[FEATURES], Optional[FEATURES], Optional[_ACTION], _INT64]
# get_stat keeps item features as raw JSON text: an item's features repeat on every line that has it, so
# they are decoded (and validated) once per distinct text, not once per record.
_RAW_RECORD = tuple[Union[_ID, str], Optional[_ID], Optional[FEATURES], msgspec.Raw, Optional[_ACTION], _INT64]
LINE_DECODER = msgspec.json.Decoder(list[_RECORD])
RAW_LINE_DECODER = msgspec.json.Decoder(list[_RAW_RECORD])
FEATURES_DECODER = msgspec.json.Decoder(Optional[FEATURES])
DecodeError = msgspec.DecodeError  # also raised for a type or range mismatch (msgspec.ValidationError)

ACTIONS = (0, 1, 2)
RECORD_HELP = "[user_id, item_id, user_feature, item_feature, action_type, timestamp]"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_features(feats: Any, what: str) -> str | None:
    if not isinstance(feats, dict):
        return f"{what} must be a dict of fid -> value"
    for k, v in feats.items():
        if not (k.isascii() and k.isdigit()):
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


def parse_line_strict(text: str | bytes, path: str, lineno: int) -> list[list]:
    """json.loads + structural validation; raises DataError naming the file and 1-based line (the reference)."""
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


def shape_ok(records: list[tuple]) -> bool:
    """What typed decoding cannot say: item null <=> action null; a profile record (item null) has a null
    item_feature; an interaction has a null user_feature."""
    _, items, ufeats, ifeats, actions, _ = zip(*records)
    n = len(items)
    if items[-1] is None and items.count(None) == 1:  # the usual line: interactions, then the profile record
        return (actions[-1] is None and actions.count(None) == 1 and ifeats[-1] is None
                and ufeats.count(None) == n - 1 + (ufeats[-1] is None))
    return all((i is None) == (a is None) and (uf is None if i is not None else f is None)
               for i, a, uf, f in zip(items, actions, ufeats, ifeats))


def keys_ok(features: list[dict | None]) -> bool:
    """Feature ids are ASCII digit strings (what check_record requires)."""
    keys = set().union(*filter(None, features))
    return all(k.isascii() and k.isdigit() for k in keys)


def decode_features(text: bytes) -> dict | None:
    """One item_feature value from its JSON text, checked as check_record checks it: FEATURES_DECODER, or
    where its types do not reach (an int beyond 64 bits, a lone surrogate) json.loads. ValueError when invalid."""
    try:
        value = FEATURES_DECODER.decode(text)
    except DecodeError:
        try:
            value = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(str(e)) from None
    err = None if value is None else _check_features(value, "item_feature")
    if err:
        raise ValueError(err)
    return value


def parse_line(text: str | bytes, path: str, lineno: int) -> list[list]:
    """The records of one line, as parse_line_strict returns them (lists, in order), by typed decoding;
    the strict parser decides every line this cannot vouch for (and gives the error message)."""
    try:
        records = LINE_DECODER.decode(text)
    except DecodeError:
        records = None
    if records and shape_ok(records) and keys_ok([r[2] for r in records] + [r[3] for r in records]):
        return [list(r) for r in records]
    return parse_line_strict(text, path, lineno)
