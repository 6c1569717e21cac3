"""records.parse_line (msgspec, the fast path) against records.parse_line_strict (json.loads + check_record,
the reference) over awkward valid lines and over random corruptions of them."""
from __future__ import annotations

import json
import random

# Awkward valid lines (also used by test_get_stat): strings with quotes, backslashes, braces, brackets, control
# characters, \\uXXXX escapes (surrogate pairs and lone surrogates), non-ASCII text; random JSON spacing (tabs,
# carriage returns), duplicate keys, profile records anywhere in the line, users as ints or raw id strings.

CHARS = list('abcXYZ019 ,:"\\/{}[]') + ["\t", "\n", "\r", "\x00", "\x1f", "\x7f", "é", "中", "\u2028", "😀", "\ufeff"]
FIDS = ["100", "101", "102", "111", "0100", "7", "1000000000000"]
INT32_MAX = 2**31 - 1


def awkward_string(rng: random.Random, n: int | None = None) -> str:
    n = rng.randint(0, 8) if n is None else n
    s = "".join(rng.choice(CHARS) for _ in range(n))
    if rng.random() < 0.1:
        s += rng.choice(["\ud800", "\udfff"])  # a lone surrogate: json.loads accepts it
    return s


def _ws(rng: random.Random) -> str:
    return "" if rng.random() < 0.6 else "".join(rng.choice(" \t\r") for _ in range(rng.randint(1, 3)))


def _encode_string(rng: random.Random, s: str) -> str:
    """A JSON string for s, in one of several legal spellings."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in s) or rng.random() < 0.4:
        return json.dumps(s)  # ASCII only, \\uXXXX escapes
    if rng.random() < 0.5:
        return json.dumps(s, ensure_ascii=False)
    out = []
    for c in s:  # escape ordinary characters too, and '/' as '\\/'
        if c == "/" and rng.random() < 0.5:
            out.append("\\/")
        elif rng.random() < 0.3 and ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04{rng.choice('xX')}}")
        else:
            out.append(json.dumps(c, ensure_ascii=False)[1:-1])
    return '"' + "".join(out) + '"'


def encode(rng: random.Random, obj) -> str:
    """JSON text for obj with random spacing; a dict given as a list of (key, value) pairs may repeat keys
    (json.loads keeps the last)."""
    if isinstance(obj, Pairs):
        parts = [_ws(rng) + _encode_string(rng, k) + _ws(rng) + ":" + _ws(rng) + encode(rng, v) + _ws(rng) for k, v in obj]
        return "{" + ",".join(parts) + _ws(rng) + "}"
    if isinstance(obj, list):
        return "[" + _ws(rng) + ("," + _ws(rng)).join(encode(rng, v) + _ws(rng) for v in obj) + "]"
    if isinstance(obj, str):
        return _encode_string(rng, obj)
    return json.dumps(obj)


class Pairs(list):
    """A JSON object as (key, value) pairs, in order, keys possibly repeated."""


def _value(rng: random.Random):
    r = rng.random()
    if r < 0.55:
        return rng.choice([0, -1, -(2**40), 1, 2, 3, 17, 255, 65536, INT32_MAX, rng.randint(1, 10**6)])
    if r < 0.8:
        return [rng.choice([1, 2, 3, -5, 0, 10**5]) for _ in range(rng.choice([0, 1, 2, 3, 20]))]
    return awkward_string(rng)


def _features(rng: random.Random, fids: list[str]) -> Pairs | None:
    if rng.random() < 0.1:
        return None
    pairs = Pairs((rng.choice(fids), _value(rng)) for _ in range(rng.randint(0, 5)))
    if pairs and rng.random() < 0.2:
        pairs.append((pairs[0][0], _value(rng)))  # a repeated key: the last one counts
    return pairs


def awkward_line(rng: random.Random, itemnum: int, users: list) -> str:
    """One valid line: its user's interactions (possibly none) and profile records (possibly several, anywhere)."""
    user = rng.choice(users)
    n = rng.choice([0, 1, 2, 5, 12])
    ts = rng.choice([1_700_000_000, -5, 2**62])
    recs = []
    for _ in range(n):
        ts += rng.choice([1, 60, 0, -7]) if rng.random() < 0.9 else 0
        recs.append([user, rng.randint(1, itemnum), None, _features(rng, FIDS), rng.randint(0, 2), ts])
    for _ in range(rng.choice([0, 1, 1, 1, 2]) if n else rng.randint(1, 2)):
        rec = [user, None, _features(rng, ["103", "106", "110", "0106"]), None, None, ts]
        recs.insert(rng.randint(0, len(recs)) if rng.random() < 0.3 else len(recs), rec)
    if len(recs) > 1 and rng.random() < 0.1:
        recs[1][0] = rng.choice(users)  # another user id on a later record: the first record's counts
    return _ws(rng) + encode(rng, recs) + _ws(rng)


def user_pool(rng: random.Random) -> list:
    """Int ids and raw id strings; some strings equal ints' spelling ("5" is not 5)."""
    return [1, 2, 5, 10**12, "5", "u\"1", "{x}", "[1, 2]", "é", "", "\\", awkward_string(rng, 4)]


def awkward_file(seed: int, lines: int, itemnum: int) -> bytes:
    """seq.jsonl bytes: awkward lines, some ending in CRLF, a BOM before the first one on some seeds."""
    rng = random.Random(seed)
    users = user_pool(rng)
    out = ["\ufeff" if seed % 2 else ""]
    for _ in range(lines):
        out.append(awkward_line(rng, itemnum, users) + ("\r\n" if rng.random() < 0.1 else "\n"))
    return "".join(out).encode("utf-8")


# --------------------------------------------------------------------------- tests

import pytest  # noqa: E402

import records  # noqa: E402
from common import DataError  # noqa: E402
from records import parse_line, parse_line_strict  # noqa: E402


def _lines(seed: int, n: int = 300) -> list[bytes]:
    return [l for l in awkward_file(seed, n, itemnum=20).split(b"\n") if l]


def _verdict(parse, line) -> tuple:
    try:
        return "ok", parse(line, "seq.jsonl", 7)
    except DataError as e:
        return "error", str(e)


@pytest.mark.parametrize("seed", range(4))
def test_fast_parse_equals_strict_and_json_on_awkward_lines(seed):
    for line in _lines(seed):
        want = json.loads(line.decode("utf-8").lstrip("\ufeff"))
        for text in (line, line.decode("utf-8")):
            got = parse_line(text, "seq.jsonl", 1)
            assert got == want == parse_line_strict(text, "seq.jsonl", 1)
            assert all(type(r) is list for r in got)


def test_fast_path_serves_ordinary_lines(monkeypatch):
    """The equality above would also hold if every line went to the strict parser: make that fail loudly."""
    lines = _lines(0)
    fast = 0
    for line in lines:
        try:
            records.LINE_DECODER.decode(line)
            fast += 1
        except records.DecodeError:
            pass
    assert fast > 0.6 * len(lines)  # the rest: lone surrogates, a BOM (the strict parser's share)

    def refuse(*a):
        raise AssertionError("strict parser called")

    monkeypatch.setattr(records, "parse_line_strict", refuse)
    assert parse_line('[[1, 2, null, {"100": "a\\"}{"}, 0, 5], [1, null, {"106": [1]}, null, null, 5]]', "x", 1)[0][3] == {"100": 'a"}{'}


BAD_VALUES = [1.5, True, False, 0, -3, 3, None, "x", {"a": 1}, [1.5], [True], ["x"], 2**64, -(2**64), [], {}]


def _corrupt(rng: random.Random, line: bytes) -> bytes:
    """A random corruption: a byte edit, or one field of one record replaced by an unusual value."""
    r = rng.random()
    if r < 0.5:
        i = rng.randrange(len(line))
        edit = rng.choice([b"", b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b" ", b"0", b"-", b".", b"e",
                           b"n", b"\x00", b"\xff", b"\xc3", b"1", b"null"])
        return line[:i] + edit + line[i + rng.choice([0, 1]):]
    recs = json.loads(line.decode("utf-8").lstrip("\ufeff"))
    rec = rng.choice(recs)
    k = rng.randrange(6)
    if r < 0.6:
        rec.insert(k, 1) if rng.random() < 0.5 else rec.pop(k)  # a record of 5 or 7 fields
    elif r < 0.7 and isinstance(rec[k], dict) and rec[k]:
        fid = rng.choice(list(rec[k]))
        rec[k][rng.choice(["x", "١٠٠", "1 ", "", "-1", "²"])] = rec[k].pop(fid)  # a feature id that is no id
    elif r < 0.8 and isinstance(rec[k], dict) and rec[k]:
        rec[k][rng.choice(list(rec[k]))] = rng.choice(BAD_VALUES)
    else:
        rec[k] = rng.choice(BAD_VALUES + [rng.randint(1, 5), {"100": 1}])
    return json.dumps(recs, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("seed", range(3))
def test_corrupted_lines_get_the_strict_verdict(seed):
    """Whatever the fast parser accepts, the strict parser accepts with the same records; whatever it refuses
    is the strict parser's to refuse, with the strict message."""
    rng = random.Random(100 + seed)
    outcomes = set()
    for line in _lines(seed, 200):
        for _ in range(10):
            bad = _corrupt(rng, line)
            want = _verdict(parse_line_strict, bad)
            assert _verdict(parse_line, bad) == want, bad
            outcomes.add(want[0])
    assert outcomes == {"ok", "error"}


def test_feature_ids_are_ascii_digits():
    for fid in ("١٠٠", "²", "1a"):
        line = json.dumps([[1, 2, None, {fid: 1}, 0, 5]])
        with pytest.raises(DataError, match=r"x:3: record 0: item_feature has a non-numeric feature id"):
            parse_line(line, "x", 3)
