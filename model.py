"""HSTU-style causal sequence model for generative next-item retrieval.

Shapes: B batch, N positions (maxlen + 1, left-padded, token 0 of a valid sequence is the user token),
D hidden, H heads, dh = D // H, Fi item sparse columns (sorted fids), Us / Ua user sparse / array
features, A array length. Every output vector is L2-normalised, so scores are cosines.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
Schema = dict[str, dict[str, int]]  # {"item_sparse" | "user_sparse" | "user_array": {fid: vocab_size}}


@dataclass
class ModelConfig:
    id_dim: int = 128  # item-id embedding width
    feat_dim: int = 128  # width of each sparse feature embedding and of each projected dense input
    hidden: int = 512  # D
    num_layers: int = 16
    num_heads: int = 8
    # HSTU: per-head width of U and V (the HSTU paper's linear dim; 0 = hidden / num_heads). Q and K keep
    # hidden / num_heads. Wider U, V widen each layer's gated output path, as SASRec's FFN widens its layer
    linear_dim: int = 0
    maxlen: int = 101  # items per sequence; N = maxlen + 1 positions (the user token comes first)
    emb_dropout: float = 0.2  # on the concatenated item-tower / user-tower inputs
    dropout: float = 0.2  # on each layer's residual branch
    num_time_buckets: int = 64  # log buckets of |dt| for the attention bias
    max_dt_days: float = 30.0  # |dt| >= this falls into the last bucket
    rel_pos_bias: bool = True  # also a learned attention bias per head per distance i - j
    # HSTU attention: "n" divides by the constant N, "valid" by the number of keys query i sees (its valid
    # tokens up to i); the time bias rab(|t_q - t_j|) takes t_q = the query token's own time ("input") or the
    # time of the item it predicts ("target", as the HSTU paper; the last position, whose item is unknown at
    # inference, keeps its own time)
    attn_norm: str = "n"
    rab_time: str = "input"
    id_init_std: float = 0.0  # item-id embedding init (0: zeros, so an untrained id adds nothing)
    item_feats: bool = True  # False: the item tower sees ids (and dense inputs) only
    # 111 has one value per item: an id in disguise that would bypass the feature-only path of cold items
    exclude_item_feats: tuple[str, ...] = ("111",)
    id_dropout: float = 0.1  # training only: share of item tokens and candidates encoded without their id
    mm_dims: tuple[int, ...] = ()  # widths of optional dense (multimodal) item inputs
    mm_fids: tuple[str, ...] = ()  # their creative_emb feature ids (one per mm_dims entry), for inference
    model: str = "hstu"  # "hstu" or "sasrec"

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists
        self.exclude_item_feats = tuple(str(f) for f in self.exclude_item_feats)
        self.mm_dims = tuple(int(d) for d in self.mm_dims)
        self.mm_fids = tuple(str(f) for f in self.mm_fids)
        if self.mm_fids and len(self.mm_fids) != len(self.mm_dims):
            raise ValueError(f"mm_fids {self.mm_fids} and mm_dims {self.mm_dims} must pair up")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")
        if self.model not in ("hstu", "sasrec"):
            raise ValueError(f"model must be 'hstu' or 'sasrec', got {self.model!r}")
        if self.linear_dim < 0:
            raise ValueError(f"linear_dim must be >= 0 (0: hidden / num_heads), got {self.linear_dim}")
        if self.num_time_buckets < 2:
            raise ValueError("num_time_buckets must be >= 2")
        if self.attn_norm not in ("n", "valid") or self.rab_time not in ("input", "target"):
            raise ValueError(f"attn_norm must be 'n' or 'valid', rab_time 'input' or 'target' "
                             f"(got {self.attn_norm!r}, {self.rab_time!r})")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")

    @property
    def num_positions(self) -> int:
        return self.maxlen + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    "reference": ModelConfig(),
    "small": ModelConfig(id_dim=32, feat_dim=16, hidden=64, num_layers=2, num_heads=2, maxlen=50,
                         num_time_buckets=32, emb_dropout=0.0, dropout=0.0),
}


def time_buckets(ts: Tensor, num_buckets: int, max_dt: float, query_ts: Tensor | None = None) -> Tensor:
    """(B, N) unix seconds of the keys (and of the queries, `query_ts`, default the same) -> (B, N, N) long:
    floor(log(|q_i - t_j| + 1) / log(base)) clamped to [0, num_buckets - 1], with base = (max_dt + 1) **
    (1 / (num_buckets - 1)) so |dt| = max_dt starts the last bucket. float64 so the bucket edges are exact
    enough to match a scalar loop."""
    q = ts if query_ts is None else query_ts
    dt = (q[:, :, None] - ts[:, None, :]).abs().double()  # int64 difference is exact
    b = torch.floor(torch.log1p(dt) * ((num_buckets - 1) / math.log1p(max_dt)))
    return b.clamp_(0, num_buckets - 1).long()


def causal_key_mask(mask: Tensor) -> Tensor:
    """(B, N) bool valid tokens -> (B, 1, N, N) bool: query i may see key j iff j <= i and j is valid."""
    n = mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return causal[None, None] & mask[:, None, None, :]


class ItemTower(nn.Module):
    """concat(item-id emb, kept sparse feature embs, mean-pooled array feature embs, projected dense inputs)
    -> dropout -> MLP. In training a share `id_dropout` of the items lose their id (id 0, features only):
    items never trained on (cold at inference) take exactly that path, so it must be trained too."""

    def __init__(self, cfg: ModelConfig, schema: Schema, itemnum: int) -> None:
        super().__init__()
        fids = sorted(schema.get("item_sparse", {}), key=int)  # column order of seq_feat / next_feat / neg_feat
        kept = [c for c, f in enumerate(fids) if f not in cfg.exclude_item_feats and cfg.item_feats]
        # array features (e.g. genres) follow the sparse columns, item_array_len[fid] slots each, mean-pooled
        arrays, lens = schema.get("item_array", {}), schema.get("item_array_len", {})
        self.array_fids, self.array_slices, c = [], [], len(fids)
        for f in sorted(arrays, key=int):
            if cfg.item_feats:
                self.array_fids.append(f)
                self.array_slices.append((c, c + int(lens[f])))
            c += int(lens[f])
        self.num_cols = c
        self.feat_fids = [fids[c] for c in kept]
        # the model drops excluded columns itself, so data files keep every column
        self.register_buffer("feat_cols", torch.tensor(kept, dtype=torch.long), persistent=False)
        self.id_emb = nn.Embedding(itemnum + 1, cfg.id_dim, padding_idx=0)
        # zero init by default: an id adds only what training taught it. Items never trained on are encoded
        # with id 0 (the padding row, always zero) at validation and inference, whatever the init
        with torch.no_grad():
            self.id_emb.weight.normal_(0.0, cfg.id_init_std) if cfg.id_init_std > 0 else self.id_emb.weight.zero_()
            self.id_emb.weight[0].zero_()
        self.feat_emb = nn.ModuleList(
            nn.Embedding(schema["item_sparse"][f], cfg.feat_dim, padding_idx=0) for f in self.feat_fids)
        self.array_emb = nn.ModuleList(nn.Embedding(arrays[f], cfg.feat_dim, padding_idx=0) for f in self.array_fids)
        self.mm_dims = list(cfg.mm_dims)
        self.mm_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(d, cfg.feat_dim), nn.LayerNorm(cfg.feat_dim)) for d in cfg.mm_dims)
        in_dim = cfg.id_dim + cfg.feat_dim * (len(kept) + len(self.array_fids) + len(cfg.mm_dims))
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.id_dropout = cfg.id_dropout
        self.mlp = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))

    def forward(self, item_ids: Tensor, item_feats: Tensor, mm: list[Tensor] | Tensor | None = None,
                id_rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # item_ids (...), item_feats (..., Fi), mm[k] (..., mm_dims[k]) or one (..., sum(mm_dims)) -> (..., D)
        # id_rows: (sorted ids (L,), their embedding rows (L, id_dim)) of --id-update rowwise, read instead of
        # the table, so that the gradient lands on the step's rows only
        if item_feats.shape[-1] != self.num_cols:
            raise ValueError(f"item_feats has {item_feats.shape[-1]} columns, schema has {self.num_cols}")
        feats = item_feats.index_select(-1, self.feat_cols)  # (..., F_kept)
        if self.training and self.id_dropout > 0:
            item_ids = item_ids.masked_fill(torch.rand(item_ids.shape, device=item_ids.device) < self.id_dropout, 0)
        ids = self.id_emb(item_ids) if id_rows is None else F.embedding(torch.searchsorted(id_rows[0], item_ids), id_rows[1])
        parts = [ids] + [emb(feats[..., c]) for c, emb in enumerate(self.feat_emb)]
        for (a, b), emb in zip(self.array_slices, self.array_emb):
            ids = item_feats[..., a:b]  # (..., A), right-padded with 0
            n = (ids > 0).sum(-1, keepdim=True).clamp(min=1)
            parts.append(emb(ids).sum(-2) / n)  # mean of the present values (padding embeds to 0)
        if len(self.mm_proj):
            if torch.is_tensor(mm):  # the data loader's concatenated rows
                if mm.shape[-1] != sum(self.mm_dims):
                    raise ValueError(f"dense item inputs have width {mm.shape[-1]}, mm_dims sum to {sum(self.mm_dims)}")
                mm = mm.split(self.mm_dims, dim=-1)
            if mm is None or len(mm) != len(self.mm_proj):
                raise ValueError(f"expected {len(self.mm_proj)} dense item inputs (mm_dims)")
            # an all-zero row means "no vector" (row 0, an item the source lacks): its projection is multiplied
            # by 0, so it contributes exactly zero instead of the LayerNorm's bias
            dt = parts[0].dtype
            parts += [proj(m.to(dt)) * (m != 0).any(-1, keepdim=True).to(dt) for proj, m in zip(self.mm_proj, mm)]
        return self.mlp(self.drop(torch.cat(parts, dim=-1)))


class UserTower(nn.Module):
    """User sparse + mean-pooled array feature embeddings -> (user-token content, FiLM gamma, beta)."""

    def __init__(self, cfg: ModelConfig, schema: Schema) -> None:
        super().__init__()
        sparse, array = schema.get("user_sparse", {}), schema.get("user_array", {})
        self.sparse = nn.ModuleList(nn.Embedding(sparse[f], cfg.feat_dim, padding_idx=0) for f in sorted(sparse, key=int))
        self.array = nn.ModuleList(nn.Embedding(array[f], cfg.feat_dim, padding_idx=0) for f in sorted(array, key=int))
        in_dim, d = cfg.feat_dim * (len(sparse) + len(array)), cfg.hidden
        self.drop = nn.Dropout(cfg.emb_dropout)
        # no bias on gamma/beta: a user-independent shift added to every token can only wash out token
        # content (training found that degenerate route, collapsing every user onto one vector)
        self.film = nn.Sequential(nn.Linear(in_dim, d), nn.SiLU(), nn.Linear(d, 2 * d, bias=False))
        self.token = nn.Sequential(nn.Linear(in_dim, d), nn.SiLU(), nn.Linear(d, d))
        # FiLM starts as the identity so early training sees plain token embeddings
        nn.init.zeros_(self.film[-1].weight)

    def features(self, user_sparse: Tensor, user_array: Tensor) -> Tensor:
        # user_sparse (B, Us), user_array (B, Ua, A) -> (B, (Us + Ua) * feat_dim)
        parts = [emb(user_sparse[:, c]) for c, emb in enumerate(self.sparse)]
        for c, emb in enumerate(self.array):
            ids = user_array[:, c]  # (B, A), right-padded with 0
            n = (ids > 0).sum(1, keepdim=True).clamp(min=1)  # (B, 1)
            parts.append(emb(ids).sum(1) / n)  # padding rows embed to 0, so this is the mean of real ids
        if not parts:
            return user_sparse.new_zeros(user_sparse.shape[0], 0, dtype=torch.float)
        return self.drop(torch.cat(parts, dim=-1))

    def forward(self, user_sparse: Tensor, user_array: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u = self.features(user_sparse, user_array)
        gamma, beta = self.film(u).chunk(2, dim=-1)  # (B, D) each
        return self.token(u), gamma, beta


class TimeFeatures(nn.Module):
    """Hour-of-day and weekday (UTC) embeddings of each token's timestamp."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hour = nn.Embedding(24, hidden)
        self.weekday = nn.Embedding(7, hidden)

    def forward(self, ts: Tensor) -> Tensor:
        # ts (B, N) unix seconds -> (B, N, D)
        hour = torch.div(ts, 3600, rounding_mode="floor") % 24
        weekday = (torch.div(ts, 86400, rounding_mode="floor") + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
        return self.hour(hour) + self.weekday(weekday)


class HSTULayer(nn.Module):
    """Pointwise-attention HSTU block: U,V,Q,K = split(SiLU(Linear(LN(x)))),
    A = SiLU(QK^T/sqrt(dh) + rab) * mask / n, y = x + dropout(Linear(LN(A V) * U)).
    Q, K have dh = D / H per head; U, V have dv = linear_dim (default dh) per head.

    n is the constant maxlen + 1 (attn_norm "n", as in HSTU: the attention stays unnormalised, so
    engagement intensity survives) or each query's number of valid keys (attn_norm "valid": a mean over
    what it sees). Neither depends on how much left padding a batch has."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.hidden, cfg.num_heads
        self.num_heads, self.head_dim = h, d // h
        self.value_dim = cfg.linear_dim or d // h  # dv
        self.n_norm = float(cfg.num_positions)
        self.norm_by_valid = cfg.attn_norm == "valid"
        self.num_buckets, self.max_dt = cfg.num_time_buckets, cfg.max_dt_days * 86400.0
        self.norm_in = nn.LayerNorm(d)
        self.uvqk = nn.Linear(d, 2 * h * self.value_dim + 2 * d)
        self.norm_attn = nn.LayerNorm(h * self.value_dim)
        self.out = nn.Linear(h * self.value_dim, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.ts_bias = nn.Embedding(cfg.num_time_buckets, h)  # rab(|dt|): one scalar per head per bucket
        self.pos_bias = nn.Embedding(cfg.num_positions, h) if cfg.rel_pos_bias else None  # per distance i - j
        for emb in (self.ts_bias, self.pos_bias):
            if emb is not None:
                nn.init.zeros_(emb.weight)

    def rab(self, ts: Tensor, buckets: Tensor | None = None) -> Tensor:
        # ts (B, N) -> relative attention bias (B, H, N, N), a view whose (N, N) blocks are contiguous
        if buckets is None:
            buckets = time_buckets(ts, self.num_buckets, self.max_dt)
        # index_select, not the Embedding call: its backward is one index_add, where Embedding's dense
        # backward sorts the B·N·N indices first (~10x slower on the CPU for a table of a few dozen rows);
        # gathered head-major, so no (B, N, N, H) -> (B, H, N, N) copy follows
        bias = self.ts_bias.weight.T.index_select(1, buckets.reshape(-1)).view(-1, *buckets.shape)  # (H, B, N, N)
        if self.pos_bias is not None:
            i = torch.arange(ts.shape[1], device=ts.device)
            rel = (i[:, None] - i[None, :]).clamp(0, self.pos_bias.num_embeddings - 1)  # (N, N)
            bias = bias + self.pos_bias(rel).permute(2, 0, 1)[:, None]  # + (H, 1, N, N)
        return bias.transpose(0, 1)

    def divisor(self, mask: Tensor) -> Tensor | float:
        # mask (B, N) -> (B, 1, N, 1) keys each query sees (at least 1), or the constant N
        if not self.norm_by_valid:
            return self.n_norm
        return mask.cumsum(1).clamp(min=1)[:, None, :, None].to(torch.float32)

    def forward(self, x: Tensor, mask: Tensor, ts: Tensor, buckets: Tensor | None = None) -> Tensor:
        # x (B, N, D), mask (B, N) bool valid tokens, ts (B, N) -> (B, N, D)
        b, n, d = x.shape
        h, dv = self.num_heads, self.value_dim
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).split([h * dv, h * dv, d, d], dim=-1)  # (B, N, H·dv | D)
        q, k = (t.reshape(b, n, h, self.head_dim).transpose(1, 2) for t in (q, k))  # (B, H, N, dh)
        v = v.reshape(b, n, h, dv).transpose(1, 2)  # (B, H, N, dv)
        # the scale on q and the 1/n on A·V (a row scaling commutes with the product): each op on an
        # (B, H, N, N) tensor costs as much as the matmul at these widths, so there are as few as possible
        s = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2) + self.rab(ts, buckets).to(q.dtype)  # (B, H, N, N)
        a = torch.where(causal_key_mask(mask), F.silu(s), 0.0)
        o = (a @ v / self.divisor(mask)).transpose(1, 2).reshape(b, n, h * dv)  # (B, N, H·dv)
        return x + self.drop(self.out(self.norm_attn(o) * u))


def hstu_layer_reference(layer: HSTULayer, x: Tensor, mask: Tensor, ts: Tensor, query_ts: Tensor | None = None) -> Tensor:
    """HSTULayer.forward written loop by loop over batch, heads, i, j (slow; a test oracle only); query_ts: the
    queries' times for the time bias (default ts), as the model passes them with rab_time "target"."""
    query_ts = ts if query_ts is None else query_ts
    b, n, d = x.shape
    h, dh, dv = layer.num_heads, layer.head_dim, layer.value_dim
    uvqk = F.silu(layer.uvqk(layer.norm_in(x)))  # per-token ops: U, V (B, N, H·dv), then Q, K (B, N, D)
    u, v, q, k = uvqk[..., :h * dv], uvqk[..., h * dv:2 * h * dv], uvqk[..., -2 * d:-d], uvqk[..., -d:]
    scale = (layer.num_buckets - 1) / math.log1p(layer.max_dt)
    rows = []
    for bi in range(b):
        for i in range(n):
            heads = []
            seen = sum(bool(mask[bi, j]) for j in range(i + 1))
            n_norm = max(seen, 1) if layer.norm_by_valid else layer.n_norm
            for hi in range(h):
                sl, slv = slice(hi * dh, (hi + 1) * dh), slice(hi * dv, (hi + 1) * dv)
                acc = torch.zeros(dv, dtype=x.dtype)
                for j in range(i + 1):  # causal: keys j <= i
                    if not bool(mask[bi, j]):
                        continue
                    dt = abs(int(query_ts[bi, i]) - int(ts[bi, j]))
                    bucket = min(max(int(math.floor(math.log1p(dt) * scale)), 0), layer.num_buckets - 1)
                    bias = layer.ts_bias.weight[bucket, hi]
                    if layer.pos_bias is not None:
                        bias = bias + layer.pos_bias.weight[min(i - j, layer.pos_bias.num_embeddings - 1), hi]
                    score = (q[bi, i, sl] * k[bi, j, sl]).sum() / math.sqrt(dh) + bias
                    acc = acc + F.silu(score) / n_norm * v[bi, j, slv]
                heads.append(acc)
            rows.append(torch.cat(heads))
    o = torch.stack(rows).reshape(b, n, h * dv)
    return x + layer.drop(layer.out(layer.norm_attn(o) * u))


class SASRecLayer(nn.Module):
    """Pre-LN causal Transformer block (softmax multi-head attention + FFN), the SASRec baseline."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.num_heads, self.p = cfg.num_heads, cfg.dropout
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, ts: Tensor, buckets: Tensor | None = None) -> Tensor:
        # x (B, N, D), mask (B, N) -> (B, N, D); ts unused (positions carry the order)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # each query also sees itself so padded rows are never fully masked (softmax over nothing = NaN)
        allowed = causal_key_mask(mask) | torch.eye(n, dtype=torch.bool, device=x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(o.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class HSTUModel(nn.Module):
    def __init__(self, cfg: ModelConfig, schema: Schema, itemnum: int) -> None:
        super().__init__()
        self.cfg, self.itemnum = cfg, itemnum
        d = cfg.hidden
        self.item_tower = ItemTower(cfg, schema, itemnum)
        self.user_tower = UserTower(cfg, schema)
        self.time_feats = TimeFeatures(d)
        self.next_action_emb = nn.Embedding(4, d, padding_idx=0)  # condition: action of the item to generate
        self.action_emb = nn.Embedding(4, d, padding_idx=0)  # the input token's own action
        self.type_emb = nn.Embedding(3, d, padding_idx=0)  # 1 item, 2 user
        self.pos_emb = nn.Embedding(cfg.num_positions, d)  # index N-1 = last (newest) position
        layer = HSTULayer if cfg.model == "hstu" else SASRecLayer
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d)
        # additive token embeddings start small so the item/user content dominates
        for emb in (self.time_feats.hour, self.time_feats.weekday, self.next_action_emb, self.action_emb,
                    self.type_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """batch (spec keys; seq_* of width n <= N) -> (B, n, D) L2-normalised outputs; row i encodes
        tokens <= i and predicts the item after token i. Padded rows hold values that mean nothing."""
        seq_type, ts = batch["seq_type"], batch["seq_ts"]  # (B, n)
        b, n = seq_type.shape
        if n > self.cfg.num_positions:
            raise ValueError(f"batch has {n} positions, the model at most {self.cfg.num_positions}")
        valid = seq_type > 0  # (B, n)
        x = self.item_tower(batch["seq_item"], batch["seq_feat"], batch.get("seq_mm"), batch.get("id_rows"))  # (B, n, D)
        user_tok, gamma, beta = self.user_tower(batch["user_sparse"], batch["user_array"])  # (B, D) each
        x = torch.where((seq_type == 2)[..., None], user_tok[:, None].to(x.dtype), x)
        x = x * (1 + torch.tanh(gamma[:, None])) + beta[:, None]  # FiLM on every token
        pos = torch.arange(self.cfg.num_positions - n, self.cfg.num_positions, device=x.device)  # right-aligned
        x = (x + self.time_feats(ts) + self.next_action_emb(batch["next_action"]) + self.action_emb(batch["seq_action"])
             + self.type_emb(seq_type) + self.pos_emb(pos)[None])
        x = x * valid[..., None]  # padding carries nothing (it is also masked as a key)
        buckets = None
        if self.cfg.model == "hstu":  # shared by every layer
            query_ts = batch["next_ts"] if self.cfg.rab_time == "target" else None
            buckets = time_buckets(ts, self.cfg.num_time_buckets, self.cfg.max_dt_days * 86400.0, query_ts)
        for layer in self.layers:
            x = layer(x, valid, ts, buckets)
        return F.normalize(self.final_norm(x), dim=-1)

    def item_vectors(self, item_ids: Tensor, item_feats: Tensor, mm: list[Tensor] | None = None,
                     id_rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # (...), (..., Fi) -> (..., D) L2-normalised candidate vectors (same tower as the input tokens)
        return F.normalize(self.item_tower(item_ids, item_feats, mm, id_rows), dim=-1)

    def user_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        # (B, D): the output at the last position, whose next_action holds the target condition
        return self(batch)[:, -1]


def param_groups(model: nn.Module, lr: float, weight_decay: float, emb_lr_scale: float = 0.5) -> list[dict]:
    """AdamW groups: nn.Embedding weights at lr * emb_lr_scale without decay (sparse rows would be shrunk by
    decay on every step while rarely receiving gradient); biases and norm weights without decay; the rest decays."""
    norms = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d)
    emb, no_decay, decay, seen = [], [], [], set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, nn.Embedding):
                emb.append(p)
            elif isinstance(mod, norms) or name == "bias" or p.ndim < 2:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [dict(params=emb, lr=lr * emb_lr_scale, weight_decay=0.0, name="embedding"),
              dict(params=no_decay, lr=lr, weight_decay=0.0, name="no_decay"),
              dict(params=decay, lr=lr, weight_decay=weight_decay, name="decay")]
    return [g for g in groups if g["params"]]
