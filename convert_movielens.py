"""Convert MovieLens-1M into the competition data format (a public benchmark, HSTU paper protocol).

    python convert_movielens.py SRC OUT [--rating-actions]

SRC is read in one of two layouts, detected from its files:
  grouplens  ratings.dat (UserID::MovieID::Rating::Timestamp), users.dat, movies.dat (ISO-8859-1), the
             original GroupLens files; each user's ratings ordered by (timestamp, then ratings-file order).
  chrono     interactions_chrono.csv.gz (user_id,movie_id,pos,rating,timestamp; ordered by pos) + users.dat
             + movies.dat. Users whose timestamps are all empty get synthetic ones: the earliest real
             timestamp of the file, then one minute apart per event (counted in OUT/conversion.json).
  (ratings.dat wins when both are present: it has real timestamps for everyone.)

Protocol (Zhai et al., ICML 2024): per user, events in time order; the LAST event is the test target
(OUT/eval/ground_truth.json), the second-to-last the validation target (held out by the trainer itself from
data/seq.jsonl, which holds every event but the last). Candidates are all items with at least one rating.
Writes OUT/data/ (seq.jsonl, seq_offsets.pkl, indexer.pkl, item_feat_dict.json), OUT/eval/ (predict_seq.jsonl,
predict_seq_offsets.pkl, predict_set.jsonl, user_action_type.json, ground_truth.json) and OUT/conversion.json.
Features: user sparse 1 gender, 2 age, 3 occupation, 4 zip prefix; item sparse 10 release year, item array
11 genres. Every value is re-indexed from 1 in ascending raw order (0 = padding).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import sys
import time
from pathlib import Path

import polars as pl

from common import atomic_save_json, atomic_write, data_error, exit_on_data_error

CHRONO_FILES = ("interactions_chrono.csv.gz", "interactions_chrono.csv")
CHRONO_HEADER = "user_id,movie_id,pos,rating,timestamp"
# Synthetic timestamps (chrono users without times): event k of the user (k = 0, 1, ... in pos order) gets
# SYNTHETIC_START + k * SYNTHETIC_STEP, SYNTHETIC_START = the earliest real timestamp in the file (or
# FALLBACK_START when it has none). Strictly increasing per user; the order is real, the times are not.
SYNTHETIC_STEP = 60
FALLBACK_START = 946684800  # 2000-01-01 00:00:00 UTC
CONVERSION_RATING = 5       # --rating-actions: this rating -> action 2 (conversion), any other -> 1 (click)
SHORT_USER = 3              # users with fewer events are kept, with a warning

# One regex per file both validates a line and splits it (capture groups = fields).
RATINGS_RE, RATINGS_HELP = r"^(\d+)::(\d+)::(\d+)::(\d+)$", "UserID::MovieID::Rating::Timestamp"
USERS_RE, USERS_HELP = r"^(\d+)::([^:]+)::(\d+)::(\d+)::([^:]+)$", "UserID::Gender::Age::Occupation::Zip-code"
MOVIES_RE, MOVIES_HELP = r"^(\d+)::(.+)::([^:]*)$", "MovieID::Title::Genres"
CHRONO_RE, CHRONO_HELP = r"^(\d+),(\d+),(\d+),(\d*),(\d*)$", "user_id,movie_id,pos,rating,timestamp (ints)"
YEAR_RE = r"\((\d{4})\)\s*$"

USER_FIDS = ("1", "2", "3", "4")   # gender, age, occupation, zip prefix
YEAR_FID, GENRE_FID = "10", "11"


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def read_table(path: Path, regex: str, names: list[str], ints: list[str], expected: str,
               header: str | None = None) -> pl.DataFrame:
    """Lines of a text file (.gz transparently; ISO-8859-1 decodes any byte) -> a frame with `ln` (1-based
    line number) and one string column per capture group of `regex`, `ints` cast to Int64 (empty -> null).
    Blank lines are skipped; any other line the regex rejects is a DataError naming it."""
    if not path.is_file():
        raise data_error(path, None, "file not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            text = f.read().decode("latin-1")
    except (OSError, EOFError) as e:
        raise data_error(path, None, f"cannot read ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    df = pl.DataFrame({"ln": pl.int_range(1, len(lines) + 1, eager=True, dtype=pl.Int64),
                       "line": pl.Series(lines, dtype=pl.String).str.strip_chars_end("\r")})
    if header is not None:
        first = df["line"][0].lstrip("\ufeff\u00ef\u00bb\u00bf") if len(df) else ""
        if first != header:
            raise data_error(path, 1, f"expected the header {header!r}, got {first[:80]!r}")
        df = df.slice(1)
    df = df.filter(pl.col("line").str.strip_chars() != "")
    ok = df["line"].str.contains(regex)
    if not ok.all():
        ln, line = df.filter(~ok).row(0)
        raise data_error(path, ln, f"malformed line {line[:80]!r}; expected {expected}")
    df = df.select("ln", pl.col("line").str.extract_groups(regex).struct.rename_fields(names)).unnest("line")
    cast = df.with_columns(pl.col(c).replace("", None).cast(pl.Int64, strict=False) for c in ints)
    for c in ints:
        bad = cast[c].is_null() & (df[c] != "")
        if bad.any():
            ln = int(df.filter(bad)["ln"][0])
            raise data_error(path, ln, f"{c} {df.filter(bad)[c][0]!r} is out of range")
    return cast


def _first_duplicate(df: pl.DataFrame, keys: list[str], path: Path, what: str) -> None:
    dup = df.filter(~pl.struct(keys).is_first_distinct())
    if len(dup):
        row = dup.row(0, named=True)
        raise data_error(path, row["ln"], f"duplicate {what} {', '.join(str(row[k]) for k in keys)}")


def _unknown(ev: pl.DataFrame, table: pl.DataFrame, key: str, path: Path, other: Path, what: str) -> None:
    miss = ev.join(table.select(key), on=key, how="anti").sort("ln")
    if len(miss):
        ln, val = miss.select("ln", key).row(0)
        raise data_error(path, ln, f"{what} {val} is not in {other.name}")


def detect_layout(src: Path) -> tuple[str, Path]:
    if not src.is_dir():
        raise data_error(src, None, "not a folder; expected the MovieLens-1M folder (ratings.dat or "
                         "interactions_chrono.csv.gz, users.dat, movies.dat)")
    if (src / "ratings.dat").is_file():
        return "grouplens", src / "ratings.dat"
    for name in CHRONO_FILES:
        if (src / name).is_file():
            return "chrono", src / name
    raise data_error(src / "ratings.dat", None, "file not found (nor interactions_chrono.csv.gz): not a "
                     "MovieLens-1M folder")


def load_events(layout: str, path: Path) -> tuple[pl.DataFrame, int | None]:
    """-> events (uid, mid, rating, ts, ln, k, n) sorted by user then time, every ts filled; the synthetic start
    (None when no user needed one)."""
    if layout == "grouplens":
        ev = read_table(path, RATINGS_RE, ["uid", "mid", "rating", "ts"], ["uid", "mid", "rating", "ts"],
                        RATINGS_HELP)
        # Ties (same user, same second: common in ML-1M) keep the ratings file order: `ln` breaks them.
        ev = ev.sort(["uid", "ts", "ln"])
    else:
        ev = read_table(path, CHRONO_RE, ["uid", "mid", "pos", "rating", "ts"],
                        ["uid", "mid", "pos", "rating", "ts"], CHRONO_HELP, header=CHRONO_HEADER)
        _first_duplicate(ev, ["uid", "pos"], path, "user_id, pos")
        ev = ev.sort(["uid", "pos"])
        # A user has timestamps on every row or on none: mixing real and synthetic times would be meaningless.
        mixed = ev.filter(pl.col("ts").is_null() & pl.col("ts").is_not_null().any().over("uid"))
        if len(mixed):
            ln, uid = mixed.sort("ln").select("ln", "uid").row(0)
            raise data_error(path, ln, f"timestamp is empty but other rows of user {uid} have one "
                             "(a user's timestamps must be all filled or all empty)")
        back = ev.filter(pl.col("ts").diff().over("uid") < 0)
        if len(back):
            ln, uid = back.sort("ln").select("ln", "uid").row(0)
            raise data_error(path, ln, f"timestamp goes back in time for user {uid} (rows must be in time order by pos)")
    ev = ev.with_columns(k=pl.int_range(pl.len()).over("uid"), n=pl.len().over("uid"))
    start = None
    if ev["ts"].null_count():
        real_min = ev["ts"].min()
        start = int(real_min) if real_min is not None else FALLBACK_START
        ev = ev.with_columns(synthetic=pl.col("ts").is_null(),
                             ts=pl.col("ts").fill_null(start + pl.col("k") * SYNTHETIC_STEP))
    else:
        ev = ev.with_columns(synthetic=pl.lit(False))
    return ev, start


def _vocab(values, key=None) -> dict:
    return {v: j + 1 for j, v in enumerate(sorted(set(values), key=key))}


def convert(src: str | os.PathLike, out: str | os.PathLike, rating_actions: bool = False) -> dict:
    """Read SRC, validate everything, then write OUT (each file atomically). Returns the conversion summary."""
    t0 = time.time()
    src, out = Path(src), Path(out)
    layout, events_path = detect_layout(src)
    users_path, movies_path = src / "users.dat", src / "movies.dat"
    users = read_table(users_path, USERS_RE, ["uid", "gender", "age", "occ", "zip"], ["uid", "age", "occ"],
                       USERS_HELP)
    movies = read_table(movies_path, MOVIES_RE, ["mid", "title", "genres"], ["mid"], MOVIES_HELP)
    _first_duplicate(users, ["uid"], users_path, "UserID")
    _first_duplicate(movies, ["mid"], movies_path, "MovieID")
    ev, synth_start = load_events(layout, events_path)
    _unknown(ev, movies, "mid", events_path, movies_path, "movie")
    _unknown(ev, users, "uid", events_path, users_path, "user")

    # Re-ids: users and items with at least one event, in ascending raw id order.
    user_ids = ev["uid"].unique().sort().to_list()
    item_ids = ev["mid"].unique().sort().to_list()
    u_reid = {u: j + 1 for j, u in enumerate(user_ids)}
    i_reid = {m: j + 1 for j, m in enumerate(item_ids)}

    # Features (vocabularies over the users and items that are kept).
    users_total, movies_total = len(users), len(movies)
    users = users.filter(pl.col("uid").is_in(user_ids)).sort("uid")
    movies = (movies.filter(pl.col("mid").is_in(item_ids)).sort("mid")
              .with_columns(year=pl.col("title").str.extract(YEAR_RE).cast(pl.Int64),
                            genres=pl.col("genres").str.split("|").list.eval(pl.element().filter(pl.element() != ""))))
    urows = users.select("uid", "gender", "age", "occ", pl.col("zip").str.slice(0, 2)).rows()
    mrows = movies.select("mid", "year", "genres").rows()
    fvocab = {"1": _vocab(r[1] for r in urows), "2": _vocab(r[2] for r in urows),
              "3": _vocab(r[3] for r in urows), "4": _vocab(r[4] for r in urows),
              YEAR_FID: _vocab(r[1] for r in mrows if r[1] is not None),
              GENRE_FID: _vocab(g for r in mrows for g in r[2])}
    profile = {u_reid[uid]: {fid: fvocab[fid][v] for fid, v in zip(USER_FIDS, rest)} for uid, *rest in urows}
    item_feats = {}
    for mid, year, genres in mrows:
        d = {}
        if year is not None:
            d[YEAR_FID] = fvocab[YEAR_FID][year]
        if genres:
            d[GENRE_FID] = sorted({fvocab[GENRE_FID][g] for g in genres})
        item_feats[i_reid[mid]] = d
    no_year = sum(1 for r in mrows if r[1] is None)

    # Actions, re-ids and the per-event JSON records (built column-wise: 1M events in about a second).
    action = (pl.when(pl.col("rating") == CONVERSION_RATING).then(2).otherwise(1) if rating_actions else pl.lit(1))
    frag = pl.DataFrame({"mid": item_ids, "ireid": list(range(1, len(item_ids) + 1)),
                         "frag": [_json(item_feats[j + 1]) for j in range(len(item_ids))]},
                        schema={"mid": pl.Int64, "ireid": pl.Int64, "frag": pl.String})
    ev = (ev.join(frag, on="mid", how="left", maintain_order="left")
          .with_columns(action.cast(pl.Int64).alias("act"),
                        pl.col("uid").replace_strict(u_reid, return_dtype=pl.Int64).alias("ureid")))
    target = ev.filter(pl.col("k") == pl.col("n") - 1).select("uid", "mid", "act", "ts").rows()
    hist = (ev.filter(pl.col("k") < pl.col("n") - 1)
            .select("ureid", "ts",
                    pl.format("[{},{},null,{},{},{}]", "ureid", "ireid", "frag", "act", "ts").alias("r"),
                    pl.format('["{}",{},null,{},{},{}]', "uid", "ireid", "frag", "act", "ts").alias("p"))
            .group_by("ureid", maintain_order=True)
            .agg(pl.col("r").str.join(","), pl.col("p").str.join(","), pl.col("ts").last()))
    hist_of = {u: (r, p, ts) for u, r, p, ts in hist.rows()}

    # Write: training lines and eval lines side by side, one user a line, in user re-id order.
    data_dir, eval_dir = out / "data", out / "eval"
    offsets, eval_offsets, off, eoff = [], [], 0, 0
    gt, uat = {}, {}
    with atomic_write(data_dir / "seq.jsonl") as f, atomic_write(eval_dir / "predict_seq.jsonl") as g:
        for uid, mid, act, tts in target:  # sorted by user
            reid = u_reid[uid]
            r, p, last_ts = hist_of.get(reid, ("", "", None))
            # profile record: the time of the last written event (a one-event user: its target's time)
            prof = _json(profile[reid])
            pts = last_ts if last_ts is not None else tts
            sep = "," if r else ""
            line = f"[{r}{sep}[{reid},null,{prof},null,null,{pts}]]\n".encode()
            eline = f'[{p}{sep}["{uid}",null,{prof},null,null,{pts}]]\n'.encode()
            f.write(line)
            g.write(eline)
            offsets.append(off)
            eval_offsets.append(eoff)
            off += len(line)
            eoff += len(eline)
            gt[str(uid)] = {"creative_id": int(mid), "action_type": int(act)}
            uat[str(uid)] = int(act)

    def dump_pickle(path: Path, obj) -> None:
        with atomic_write(path) as h:
            pickle.dump(obj, h, protocol=4)

    dump_pickle(data_dir / "seq_offsets.pkl", offsets)
    dump_pickle(eval_dir / "predict_seq_offsets.pkl", eval_offsets)
    dump_pickle(data_dir / "indexer.pkl", {"u": {str(u): r for u, r in u_reid.items()},
                                           "i": {int(m): r for m, r in i_reid.items()}, "f": fvocab})
    with atomic_write(data_dir / "item_feat_dict.json") as h:
        h.write(_json({str(j): d for j, d in item_feats.items()}).encode())
    with atomic_write(eval_dir / "predict_set.jsonl") as h:
        h.write("".join(f'{{"creative_id":{m},"retrieval_id":{i_reid[m]},"features":{_json(item_feats[i_reid[m]])}}}\n'
                        for m in item_ids).encode())
    for name, obj in (("user_action_type.json", uat), ("ground_truth.json", gt)):
        with atomic_write(eval_dir / name) as h:
            h.write(_json(obj).encode())

    n_users, n_events = len(user_ids), len(ev)
    synth_users = int(ev.filter(pl.col("k") == 0)["synthetic"].sum())
    short = int(ev.filter((pl.col("k") == 0) & (pl.col("n") < SHORT_USER)).height)
    acts = ev["act"].value_counts().sort("act").rows()
    summary = {
        "layout": layout,
        "source_files": [events_path.name, users_path.name, movies_path.name],
        "users": n_users,
        "items": len(item_ids),
        "events": n_events,
        "train_events": n_events - n_users,
        "test_targets": n_users,
        "synthetic_timestamp_users": synth_users,
        "synthetic_timestamps": (
            f"{synth_users} users had no timestamps: their events (in the file's pos order) got synthetic ones, "
            f"{synth_start} (the earliest real timestamp) + {SYNTHETIC_STEP} s per event; order real, times not"
            if synth_users else "none: every timestamp is from the data"),
        "actions": ({"mode": "rating", f"rating {CONVERSION_RATING}": 2, "other ratings": 1, "no rating": 1}
                    if rating_actions else {"mode": "all clicks", "every rating": 1}),
        "action_counts": {str(a): int(c) for a, c in acts},
        "protocol": "per user in time order: last event = test target (eval/ground_truth.json), all others in "
                    "data/seq.jsonl (its last = validation target, held out by the trainer)",
        "users_fewer_than_3_events": short,
        "users_without_events": users_total - n_users,
        "movies_without_events": movies_total - len(item_ids),
        "items_without_year": no_year,
        "features": {"user": {"1": "gender", "2": "age", "3": "occupation", "4": "zip code prefix (2 chars)"},
                     "item": {YEAR_FID: "release year (sparse)", GENRE_FID: "genres (array)"}},
        "seconds": round(time.time() - t0, 2),
    }
    atomic_save_json(summary, out / "conversion.json")
    if short:
        print(f"warning: {short:,} users have fewer than {SHORT_USER} events (kept; they have no training target "
              "left once the trainer holds out their validation event)", file=sys.stderr)
    synth = f"{synth_users:,} with synthetic timestamps" if synth_users else "no synthetic timestamps"
    print(f"convert_movielens: {n_users:,} users, {len(item_ids):,} items, {n_events:,} events "
          f"({n_events - n_users:,} train + {n_users:,} test targets), {synth}, {layout} layout, "
          f"{summary['seconds']:.1f}s -> {out}")
    return summary


@exit_on_data_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="MovieLens-1M folder: ratings.dat or interactions_chrono.csv.gz, users.dat, movies.dat")
    ap.add_argument("out", help="output folder (gets data/, eval/ and conversion.json)")
    ap.add_argument("--rating-actions", action="store_true",
                    help=f"rating {CONVERSION_RATING} -> action 2 (conversion), other ratings -> 1 (click); "
                         "default: every rating is a click")
    args = ap.parse_args(argv)
    convert(args.src, args.out, args.rating_actions)


if __name__ == "__main__":
    main()
