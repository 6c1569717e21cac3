"""Write a realistic synthetic dataset in the TAAC 2025 competition format.

    python make_sample_data.py --out sample_data [--users 6000] [--items 4000] [--seed 42]

Writes OUT/data/ (seq.jsonl, seq_offsets.pkl, indexer.pkl, item_feat_dict.json) and
OUT/eval/ (predict_seq.jsonl, predict_seq_offsets.pkl, predict_set.jsonl, user_action_type.json,
ground_truth.json); with --mm-emb-id also OUT/data/creative_emb/ (multimodal vectors that carry
the item's topic and style). The data has learnable structure: every item belongs to one of K latent
topics (revealed by features 101/114/116/117) and has one of a few styles (revealed by no sparse
feature, only by the multimodal vectors, as an image's look is); every user has a few interest topics
that drift slowly along the sequence and one preferred style; exposures mix popularity with interest
(mostly in the preferred style), and clicks/conversions are far more likely on items of the user's
current interests. Items have log-normal popularity and limited lifetimes.
Lines are streamed to disk, so memory stays bounded for any number of users.
"""
import argparse
import contextlib
import json
import os
import pickle

import numpy as np
from tqdm import tqdm

from common import HelpFormatter, atomic_write

DAY = 86400
T0 = 1743465600            # 2025-04-01 00:00:00 UTC, start of the simulated window
WINDOW_DAYS = 75
CHUNK = 1024               # users simulated per vectorised step (fixed: part of the determinism)
# Real vocabulary sizes (official 1k sample); scaled down to the catalogue where they exceed it.
ITEM_VOCAB = {"100": 6, "101": 44, "102": 11136, "112": 25, "114": 17, "115": 187, "116": 18,
              "117": 285, "118": 745, "119": 1745, "120": 1343, "121": 49079, "122": 11151}
USER_SPARSE = {"103": 67, "104": 2, "105": 7, "109": 3}
USER_ARRAY = {"106": 13, "107": 17, "108": 4, "110": 2}
# Key order of an item feature dict, as in the real files (111 = one value per item).
ITEM_KEY_ORDER = ["112", "117", "118", "119", "120", "100", "101", "102", "122", "114", "115",
                  "116", "121", "111"]
BLOCK_112_120 = ["112", "117", "118", "119", "120"]   # missing together on ~15% of items
TOPIC_FEATS = {"101": 0.9, "114": 0.85, "116": 0.85, "117": 0.8}  # fid -> P(value follows topic)
EVERGREEN = 0.05           # share of items alive over the whole window
INTEREST_SHARE = 0.5       # P(an exposure is drawn from the current interest topic)
STYLES, P_STYLE = 4, 0.8   # styles per topic; P(an interest exposure is in the user's preferred style)
P_BASE, P_GAIN, P_CONV = 0.01, 0.36, 0.2   # P(click or conv) = base + gain * affinity; conv share
P_NEW_ITEM, P_COLD_USER_FEAT = 0.04, 0.03  # eval-only cold start rates
# Multimodal vectors (creative_emb/, only with --mm-emb-id): the real dims; text vectors (81, 82) cover most
# items, image ones far fewer. Each vector is its item's topic direction plus its style direction plus noise of norm
# MM_NOISE, unit length. At noise norm 1.0 the item-specific noise acted as a fixed random item code the model
# memorised (lower training loss, lower validation Score on 3 of 3 seeds); at 0.3 topic and style dominate.
MM_DIMS = {81: 32, 82: 1024, 83: 3584, 84: 4096, 85: 3584, 86: 3584}
MM_COVERAGE = {81: 0.85, 82: 0.85, 83: 0.4, 84: 0.4, 85: 0.4, 86: 0.4}
MM_NOISE, MM_PARTS = 0.3, 4


def spread_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n sorted, unique, non-contiguous non-negative ints (raw id suffixes look sparse)."""
    return np.cumsum(rng.integers(1, 4, n)) - 1


def skewed(rng: np.random.Generator, vocab: int, n: int, s: float = 1.0) -> np.ndarray:
    """n re-ids in 1..vocab with Zipf-like frequencies over a random ranking of the values."""
    p = 1.0 / np.arange(1, vocab + 1) ** s
    return rng.permutation(vocab)[rng.choice(vocab, n, p=p / p.sum())] + 1


class World:
    """The catalogue: items, their topics, features, popularity, lifetimes and the samplers."""

    def __init__(self, rng: np.random.Generator, items: int, users: int, topics: int):
        K, M = topics, items
        self.K, self.M = K, M
        self.n_new = max(K // 4, M // 20)             # eval-only items, unseen in training
        n_all = M + self.n_new
        # Raw creative ids: sorted sparse ids; a random subset becomes the eval-only items.
        raw = 20_000_000_000 + spread_ids(rng, n_all)
        is_new = np.zeros(n_all, bool)
        is_new[rng.choice(n_all, self.n_new, replace=False)] = True
        self.raw = np.concatenate([raw[~is_new], raw[is_new]])   # index j < M: re-id j + 1
        self.topic = rng.integers(0, K, n_all)
        self.style = rng.integers(0, STYLES, n_all)
        # Log-normal popularity: heavy tail (top 10% of items get > half the events) but a flatter
        # head than a pure Zipf law, so a global top-10 list alone cannot score well.
        pop = np.exp(1.1 * rng.standard_normal(n_all))
        # Lifetimes in days: launch spread over the window, 10..45 days alive, a few evergreen.
        launch = rng.integers(-30, WINDOW_DAYS - 5, n_all)
        end = launch + rng.integers(10, 46, n_all)
        ever = rng.random(n_all) < EVERGREEN
        ever[np.argmin(pop[:M])] = True                          # at least one item always alive
        launch[ever], end[ever] = -1, WINDOW_DAYS + 1

        # Vocabularies: real sizes, capped by the catalogue (items) or population (users).
        cap_i, cap_u = max(2, M // 2), max(2, users // 2)
        self.vocab = {f: min(v, cap_i) for f, v in ITEM_VOCAB.items()}
        self.vocab["111"] = M
        self.vocab.update({f: min(v, cap_u) for f, v in {**USER_SPARSE, **USER_ARRAY}.items()})
        self.raw_feat = {f: int(f) * 10**8 + spread_ids(rng, v) for f, v in sorted(self.vocab.items())}
        self.cold_next = {f: 0 for f in self.vocab}              # counters of unseen raw values

        # Item features (re-ids, 0 = missing). Topic features map a topic to a value (or a block
        # of values for 117) with high probability; the rest are noise with Zipf-like frequencies.
        feat = {f: skewed(rng, self.vocab[f], n_all) for f in ITEM_VOCAB}
        for f, p_follow in TOPIC_FEATS.items():
            v = self.vocab[f]
            per = max(1, v // K)
            table = rng.permutation(v)                            # topic -> value block
            follow = (table[(self.topic * per + rng.integers(0, per, n_all)) % v] + 1)
            feat[f] = np.where(rng.random(n_all) < p_follow, follow, feat[f])
        feat["111"] = np.concatenate([rng.permutation(M) + 1, np.zeros(self.n_new, int)])
        feat["115"][rng.random(n_all) >= 0.25] = 0                # 115 on about a quarter of items
        block_missing = rng.random(n_all) < 0.15
        for f in BLOCK_112_120:
            feat[f][block_missing] = 0
        # Cold start: eval-only items carry some feature values unseen in training (strings).
        cold = {"111": np.ones(self.n_new, bool), "121": rng.random(self.n_new) < 0.5,
                "102": rng.random(self.n_new) < 0.3, "122": rng.random(self.n_new) < 0.3}
        cols = {f: feat[f].tolist() for f in ITEM_KEY_ORDER}
        self.frag = []                                            # JSON of each item's features
        for j in range(n_all):
            d = {}
            for f in ITEM_KEY_ORDER:
                if j >= M and f in cold and cold[f][j - M]:
                    d[f] = self.cold_value(f)
                elif cols[f][j]:
                    d[f] = cols[f][j]
            self.frag.append(json.dumps(d))

        # Sampler: per time bucket, a cumulative popularity over alive training items sorted by
        # (topic, style), flattened over buckets, so one searchsorted draws items for any (bucket,
        # topic) or (bucket, topic, style).
        self.g = max(1, -(-WINDOW_DAYS * M // 10_000_000))        # days per bucket: cum <= ~1e7 floats
        self.nb = -(-(WINDOW_DAYS + 1) // self.g)
        lb, eb = launch[:M] // self.g, np.maximum(launch[:M] // self.g + 1, -(-end[:M] // self.g))
        sub = self.topic[:M] * STYLES + self.style[:M]           # sub-topic: (topic, style)
        self.order = np.argsort(sub, kind="stable")              # sub-topic-sorted item indices
        b = np.arange(self.nb)[:, None]
        w = np.where((lb[self.order] <= b) & (b < eb[self.order]), pop[:M][self.order], 0.0)
        w /= w.sum(1, keepdims=True)                              # (nb, M)
        self.cum = np.cumsum(w.ravel())                           # (nb * M,)
        seg = np.searchsorted(sub[self.order], np.arange(K * STYLES + 1))  # sub-topic segments
        padded = np.concatenate([[0.0], self.cum])
        self.edges = padded[np.arange(self.nb)[:, None] * M + seg[None, :]]  # (nb, K * STYLES + 1)
        # Eval-only items grouped by topic (test users see them in place of a few exposures).
        self.new_order = M + np.argsort(self.topic[M:], kind="stable")
        self.new_seg = np.searchsorted(self.topic[self.new_order], np.arange(K + 1))

    def cold_value(self, fid: str) -> str:
        """A raw value never in the indexer, written as a string like the competition's."""
        self.cold_next[fid] += 1
        return str(int(self.raw_feat[fid][-1]) + self.cold_next[fid])

    def sample_items(self, rng, bucket: np.ndarray, topic: np.ndarray, style: np.ndarray,
                     interest: np.ndarray, styled: np.ndarray):
        """Draw one alive training item per event: from (`topic`, `style`) where styled, else from `topic`
        where interest, else global; an empty segment (no alive item there) widens to the next level."""
        e, S = self.edges, STYLES
        lo, hi = e[bucket, 0], e[bucket, -1]
        for use, a, b in ((interest, topic * S, topic * S + S), (styled, topic * S + style, topic * S + style + 1)):
            ok = use & (e[bucket, b] > e[bucket, a])
            lo, hi = np.where(ok, e[bucket, a], lo), np.where(ok, e[bucket, b], hi)
        u = np.minimum(lo + rng.random(len(lo)) * (hi - lo), np.nextafter(hi, -np.inf))
        idx = np.searchsorted(self.cum, u, side="right")
        return self.order[idx - bucket * self.M]

    def simulate(self, rng, B: int, new_items: bool):
        """Simulate B users. Returns per-user lengths and flat per-event arrays, user features."""
        K = self.K
        n = rng.integers(10, 101, B)                               # events per user
        user = np.repeat(np.arange(B), n)
        E = len(user)
        pos = (np.arange(E) - np.repeat(np.cumsum(n) - n, n)) / n[user]   # progress in [0, 1)
        # Interests: 3 persistent topics (Dirichlet weights) + 1 drift topic growing over time.
        slots = np.argsort(rng.random((B, K)), axis=1)[:, :4]      # (B, 4) distinct topics
        w0 = rng.dirichlet(np.full(3, 0.5), B)
        drift = (rng.uniform(0.2, 0.6, B)[user] * pos)[:, None]
        wts = np.concatenate([w0[user] * (1 - drift), drift], axis=1)      # (E, 4)
        slot = (rng.random(E)[:, None] > np.cumsum(wts, 1)).sum(1).clip(0, 3)
        z = slots[user, slot]                                      # current interest topic
        # Time: 30..60 day span per user, events clustered into 3..12 sessions, sorted per user.
        span = rng.uniform(30, 60, B) * DAY
        start = T0 + rng.random(B) * (WINDOW_DAYS * DAY - span)
        S = rng.integers(3, 13, B)
        sess = (rng.random(E) * S[user]).astype(int)
        t = (start[user] + rng.random((B, 12))[user, sess] * (span[user] - 3 * 3600)
             + np.minimum(rng.exponential(600, E), 3 * 3600))
        t = t[np.lexsort((t, user))].astype(np.int64)
        bucket = np.clip((t - T0) // DAY // self.g, 0, self.nb - 1)
        # Exposures: interest topic (mostly in the user's style) or global popularity, among items
        # alive at that time.
        taste = rng.integers(0, STYLES, B)                          # preferred style
        interest = rng.random(E) < INTEREST_SHARE
        styled = interest & (rng.random(E) < P_STYLE)
        item = self.sample_items(rng, bucket, z, taste[user], interest, styled)
        if new_items:                                              # a few unseen-in-training items
            swap = rng.random(E) < P_NEW_ITEM
            lo, hi = self.new_seg[z], self.new_seg[z + 1]
            lo, hi = np.where(hi > lo, lo, 0), np.where(hi > lo, hi, self.n_new)
            pick = self.new_order[lo + (rng.random(E) * (hi - lo)).astype(int)]
            item = np.where(swap, pick, item)
        # Actions: P(click or conversion) grows with the item topic's current interest weight.
        aff = ((slots[user] == self.topic[item][:, None]) * wts).sum(1)
        p = P_BASE + P_GAIN * aff
        r = rng.random(E)
        action = np.where(r < p * P_CONV, 2, np.where(r < p, 1, 0))
        # User features: sparse ints; arrays of 1..3 distinct ints (106 hints the main topic).
        uf = {f: skewed(rng, self.vocab[f], B) for f in USER_SPARSE}
        for f in USER_ARRAY:
            vals = skewed(rng, self.vocab[f], 3 * B).reshape(B, 3)
            if f == "106":
                hint = slots[np.arange(B), w0.argmax(1)] % self.vocab[f] + 1
                vals[:, 0] = np.where(rng.random(B) < 0.7, hint, vals[:, 0])
            present = (rng.random(B) < 0.6) | (f == "106")
            uf[f] = (vals, rng.integers(1, 4, B), present)
        return n, item, action, t, uf

    def profile(self, uf, i: int, cold_mask=None) -> dict:
        """User i's feature dict of a simulated chunk (cold strings where cold_mask is set)."""
        d = {}
        for f in ("103", "104", "105", "106", "107", "108", "109", "110"):
            if f in USER_SPARSE:
                d[f] = self.cold_value(f) if cold_mask is not None and cold_mask[f][i] else int(uf[f][i])
            elif uf[f][2][i]:
                d[f] = list(dict.fromkeys(uf[f][0][i, : uf[f][1][i]].tolist()))
        return d


def write_lines(f, offset: int, uid_json: str, mids, items, actions, ts, prof: dict, offsets):
    """Append one user's line (interactions then the profile record); return the new offset."""
    recs = [f"[{uid_json}, {mids[j]}, {a}, {t}]" for j, a, t in zip(items, actions, ts)]
    recs.append(f"[{uid_json}, null, {json.dumps(prof)}, null, null, {ts[-1]}]")
    line = "[" + ", ".join(recs) + "]\n"
    data = line.encode()
    f.write(data)
    offsets.append(offset)
    return offset + len(data)


def write_creative_emb(world: World, data_dir: str, fid: int, seed: int) -> int:
    """DATA/creative_emb/ in the real layouts: emb_81_32.pkl ({raw creative id: list of floats}) for 81,
    emb_{fid}_{dim}/part-0000k JSON lines {"anonymous_cid": ..., "emb": [...]} for the others. Covers
    MM_COVERAGE[fid] of all items, eval-only ones included, in random order; returns the number of vectors."""
    dim = MM_DIMS[fid]
    rng = np.random.default_rng([seed, 81_000 + fid])  # its own stream: the rest of the sample is unchanged
    dirs = rng.standard_normal((world.K + STYLES, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)  # (K + STYLES, dim) one direction per topic, then per style
    n_all = len(world.raw)
    order = rng.permutation(np.flatnonzero(rng.random(n_all) < MM_COVERAGE[fid]))
    folder = os.path.join(data_dir, "creative_emb")
    os.makedirs(folder, exist_ok=True)
    pkl = {} if fid == 81 else None
    parts = np.array_split(order, MM_PARTS)
    for k, part in enumerate(parts):
        with contextlib.ExitStack() as stack:
            if pkl is None:
                sub = os.path.join(folder, f"emb_{fid}_{dim}")
                os.makedirs(sub, exist_ok=True)
                g = stack.enter_context(atomic_write(os.path.join(sub, f"part-{k:05d}")))
            for s in range(0, len(part), 4096):  # rows at a time: bounded memory for large catalogues
                rows = part[s:s + 4096]
                v = (dirs[world.topic[rows]] + dirs[world.K + world.style[rows]]
                     + MM_NOISE * rng.standard_normal((len(rows), dim)) / np.sqrt(dim))
                v = np.round(v / np.linalg.norm(v, axis=1, keepdims=True), 6).tolist()  # 6 decimals: smaller files
                raw = world.raw[rows].tolist()
                if pkl is not None:
                    pkl.update(zip(raw, v))
                else:
                    g.write("".join(json.dumps({"anonymous_cid": r, "emb": e}) + "\n" for r, e in zip(raw, v)).encode())
    if pkl is not None:
        with atomic_write(os.path.join(folder, f"emb_{fid}_{dim}.pkl")) as g:
            pickle.dump(pkl, g, protocol=4)  # lists, not numpy arrays: plain containers load safely anywhere
    return len(order)


def generate(out_dir: str, users: int = 6000, items: int = 4000, seed: int = 42, topics: int = 24,
             test_users: int | None = None, progress: bool = True, mm_emb_ids: tuple[int, ...] = (),
             eval_user_ids: str = "raw") -> dict:
    """Write the dataset under out_dir (data/ and eval/, and data/creative_emb/ for `mm_emb_ids`);
    return a summary dict. eval_user_ids: 'raw' (predict_seq names users by raw id strings, as the competition
    does) or 'reid' (integer re-ids, as in seq.jsonl; indexer['u'] then covers the test users too)."""
    if users < 1 or items < 1 or topics < 4:
        raise ValueError("need users >= 1, items >= 1 and topics >= 4 (4 interest slots a user)")
    bad = [f for f in mm_emb_ids if f not in MM_DIMS]
    if bad or len(set(mm_emb_ids)) != len(mm_emb_ids):
        raise ValueError(f"mm_emb_ids must be distinct ids among {sorted(MM_DIMS)}, got {list(mm_emb_ids)}")
    if eval_user_ids not in ("raw", "reid"):
        raise ValueError(f"eval_user_ids must be 'raw' or 'reid', got {eval_user_ids!r}")
    if items > 30_000_000:
        raise ValueError("items must be <= 30,000,000 (raw feature values are fid * 10**8 + k)")
    n_test = max(1, users // 10 if test_users is None else test_users)
    world_rng, train_rng, test_rng = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    world = World(world_rng, items, users, topics)
    M = world.M
    data_dir, eval_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "eval")
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(eval_dir, exist_ok=True)
    # Raw user ids: sparse sorted numbers; a random subset are the (disjoint) test users.
    raw_users = spread_ids(world_rng, users + n_test)
    is_test = np.zeros(len(raw_users), bool)
    is_test[world_rng.choice(len(raw_users), n_test, replace=False)] = True
    train_raw, test_raw = raw_users[~is_test].tolist(), raw_users[is_test].tolist()
    bar = tqdm(total=users + n_test, unit="user", disable=not progress)

    # Training users: item ids are re-ids (j + 1) everywhere.
    mids = [f"{j + 1}, null, {world.frag[j]}" for j in range(M)]
    counts, offsets, off, done = np.zeros(3, np.int64), [], 0, 0
    with atomic_write(os.path.join(data_dir, "seq.jsonl")) as f:
        while done < users:
            B = min(CHUNK, users - done)
            n, item, action, t, uf = world.simulate(train_rng, B, new_items=False)
            counts += np.bincount(action, minlength=3)
            ends = np.cumsum(n).tolist()
            item, action, t = item.tolist(), action.tolist(), t.tolist()
            for i in range(B):
                a, b = ends[i] - n[i], ends[i]
                off = write_lines(f, off, str(done + i + 1), mids, item[a:b], action[a:b], t[a:b],
                                  world.profile(uf, i), offsets)
            done += B
            bar.update(B)

    # Test users: history = events before their last click/conversion (the target). Users whose
    # only click is their first event or who have none are redrawn. Unseen items keep raw ids.
    mids_eval = mids + [f"{world.raw[j]}, null, {world.frag[j]}" for j in range(M, len(world.raw))]
    gt, uat, eval_offsets, off, done = {}, {}, [], 0, 0
    with atomic_write(os.path.join(eval_dir, "predict_seq.jsonl")) as f:
        while done < n_test:
            n, item, action, t, uf = world.simulate(test_rng, CHUNK, new_items=True)
            cold = {k: test_rng.random(CHUNK) < P_COLD_USER_FEAT for k in USER_SPARSE}
            ends = np.cumsum(n).tolist()
            item, action, t = item.tolist(), action.tolist(), t.tolist()
            for i in range(CHUNK):
                a, b = ends[i] - n[i], ends[i]
                pos = [k for k in range(a + 1, b) if action[k] > 0]
                if not pos or done >= n_test:
                    continue
                k = pos[-1]
                uid = f"user_{test_raw[done]:08d}"
                gt[uid] = {"creative_id": int(world.raw[item[k]]), "action_type": action[k]}
                uat[uid] = action[k]
                field = json.dumps(uid) if eval_user_ids == "raw" else str(users + done + 1)  # re-ids after training's
                off = write_lines(f, off, field, mids_eval, item[a:k], action[a:k],
                                  t[a:k], world.profile(uf, i, cold), eval_offsets)
                done += 1
                bar.update(1)
    bar.close()

    # Side files: indexer, item features, candidates, targets (all atomic).
    def dump_pickle(path, obj):
        with atomic_write(path) as g:
            pickle.dump(obj, g, protocol=4)

    dump_pickle(os.path.join(data_dir, "seq_offsets.pkl"), offsets)
    dump_pickle(os.path.join(eval_dir, "predict_seq_offsets.pkl"), eval_offsets)
    test_reids = {f"user_{r:08d}": users + i + 1 for i, r in enumerate(test_raw)} if eval_user_ids == "reid" else {}
    indexer = {"u": {**{f"user_{r:08d}": i + 1 for i, r in enumerate(train_raw)}, **test_reids},
               "i": {int(r): j + 1 for j, r in enumerate(world.raw[:M].tolist())},
               "f": {f: {int(r): k + 1 for k, r in enumerate(world.raw_feat[f].tolist())}
                     for f in sorted(world.vocab)}}
    dump_pickle(os.path.join(data_dir, "indexer.pkl"), indexer)
    with atomic_write(os.path.join(data_dir, "item_feat_dict.json")) as g:
        g.write(("{" + ", ".join(f'"{j + 1}": {world.frag[j]}' for j in range(M)) + "}").encode())
    with atomic_write(os.path.join(eval_dir, "predict_set.jsonl")) as g:
        for j in range(len(world.raw)):
            g.write(f'{{"creative_id": {world.raw[j]}, "retrieval_id": {j + 1}, '
                    f'"features": {world.frag[j]}}}\n'.encode())
    for name, obj in (("user_action_type.json", uat), ("ground_truth.json", gt)):
        with atomic_write(os.path.join(eval_dir, name)) as g:
            g.write(json.dumps(obj).encode())

    mm = {str(f): write_creative_emb(world, data_dir, f, seed) for f in mm_emb_ids}
    total = int(counts.sum())
    summary = {"users": users, "test_users": n_test, "items": M, "new_items": world.n_new,
               "events": total, "action_counts": counts.tolist(), "out_dir": out_dir}
    if mm:
        summary["mm_vectors"] = mm
    mix = "/".join(f"{100 * c / max(total, 1):.1f}" for c in counts)
    print(f"sample data: {users} users (+{n_test} test), {M} items (+{world.n_new} eval-only), "
          f"{total} events, expo/click/conv % {mix} -> {out_dir}"
          + "".join(f"; creative_emb {f}: {n} vectors" for f, n in mm.items()))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--out", default="sample_data", help="output folder (gets data/ and eval/)")
    ap.add_argument("--users", type=int, default=6000, help="training users in seq.jsonl")
    ap.add_argument("--items", type=int, default=4000, help="training items (catalogue size)")
    ap.add_argument("--seed", type=int, default=42, help="random seed (output is deterministic)")
    ap.add_argument("--topics", type=int, default=24, help="latent interest topics (>= 4)")
    ap.add_argument("--mm-emb-id", type=int, nargs="*", default=[], choices=sorted(MM_DIMS), metavar="FID",
                    help="also write multimodal vectors DATA/creative_emb/ for these feature ids (81..86, real dims "
                         "81:32 82:1024 83:3584 84:4096 85:3584 86:3584); default none")
    ap.add_argument("--test-users", type=int, default=None,
                    help="eval users, disjoint from training (default: users // 10, at least 1)")
    ap.add_argument("--eval-user-ids", choices=["raw", "reid"], default="raw",
                    help="how predict_seq.jsonl names its users: raw id strings, as the competition's files do, or "
                         "integer re-ids of indexer['u'], as seq.jsonl does (the indexer then covers the test users)")
    args = ap.parse_args()
    generate(args.out, args.users, args.items, args.seed, args.topics, args.test_users, mm_emb_ids=args.mm_emb_id,
             eval_user_ids=args.eval_user_ids)


if __name__ == "__main__":
    main()
