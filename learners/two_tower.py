"""Two-tower retrieval model: user and item towers trained on clicks with in-batch negatives.

Rows are the flat example dicts of :mod:`learners.encoding` (as built by
``logs.events.example_row``). The **user tower** sees ``user_id`` and the row's
categorical (``str``) context fields that are neither item fields nor excluded (e.g.
``user_segment``, ``ctx_device``); numeric context is left out because in these logs it is
per impression (OBD's ``affinity_shown`` is a user x item score that would leak the item).
The **item tower** sees ``item_id`` and the fields named ``item_*`` (categorical and
numeric). Both end in an L2 normalisation, so ``<user, item>`` is a cosine in [-1, 1] and
the item vectors go straight into :mod:`index.faiss_index`.

**Behaviour** (``behaviour_len > 0``, YouTube-DNN style): the user tower also reads the
row's ``hist_seq`` (the user's last clicked items, most recent first, with ``hist_seq_age``
in seconds; see the history contract) through :class:`HistoryPool`: the items' rows of the
item tower's own id embedding table (shared, so a click trains both sides of the same
vector) averaged with learned age-bucket weights, plus the log of the history's length.
A user with no history pools to zeros and is scored from id and context alone.

Training (:meth:`TwoTowerModel.learn_many`) uses only the clicked rows of a labelled batch:
each click is a (user, item) positive and the other clicks of the batch are its negatives
(in-batch softmax at ``temperature``), plus hard negatives (items ranked high for the user
but not clicked, e.g. :meth:`index.hard_negatives.HardNegativePool.sample`) whose share of
the negatives ramps linearly from 0 to ``max_hard_share`` (at most 0.5) over
``ramp_examples`` clicks, plus ``uniform_negatives`` items drawn uniformly from every item
the model has seen shown (mixed negative sampling, Yang et al. 2020: in-batch negatives
are only ever clicked items, so an item shown but never clicked would never be scored
down). ``loss="sampled_softmax"`` subtracts from every logit the log of the probability
that its item is among the step's negatives (Yi et al. 2019's logQ correction, with each
item listed once): ``1 - (1 - q)^B (1 - n / M)`` for ``B`` clicks, ``q`` the item's share
of recent clicks from a decayed count-min sketch, ``n`` uniform draws from ``M``
remembered items; for rare items without uniform draws this is ``log q`` plus a constant.
Without it the model learns ``p(item | user) / q(item)`` and under-recommends popular
items (hard negatives get the same correction, so one scale holds for every logit).
``loss="info_nce"`` is the uncorrected in-batch softmax. ``sampled_softmax`` lists each
distinct item of the batch once as a negative and, with ``remove_accidental_hits`` (the
default), masks a row's own item out of its negatives (otherwise it appears twice and
bounds the loss below by log 2); ``info_nce`` counts another click on the same item as a
negative.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learners.base import Rows, labels_and_weights
from learners.encoding import SEQ_FIELD, EncoderConfig, FeatureEncoder, inference
from learners.losses import info_nce_loss, sampled_softmax_loss
from learners.models import N_AGE_BUCKETS, age_buckets
from learners.ranker import atomic_torch_save, guarded_step, pick_device

__all__ = [
    "BEHAVIOUR_POOLS",
    "TWO_TOWER_LOSSES",
    "HardNegativeSource",
    "HistoryPool",
    "TwoTowerConfig",
    "TwoTowerModel",
]

HardNegativeSource = Callable[[str, int], list[str]]
"""``hard_negatives(user_id, n) -> up to n item ids`` ranked high for the user, not clicked."""

TWO_TOWER_LOSSES = ("info_nce", "sampled_softmax")
BEHAVIOUR_POOLS = ("mean", "attention", "item_tower")
_EMB_STD = 0.05
_VECTOR_CHUNK = 8192  # rows per forward pass in user_vectors / item_vectors


def _user_encoder() -> EncoderConfig:
    return EncoderConfig(num_buckets=2**18, max_cat_fields=8, max_num_fields=0, max_seq_len=0)


def _item_encoder() -> EncoderConfig:
    return EncoderConfig(num_buckets=2**18, max_cat_fields=8, max_num_fields=4, max_seq_len=0)


@dataclass(frozen=True)
class TwoTowerConfig:
    """Two-tower settings.

    Attributes:
        embedding_dim: output dimension D of both towers (the index dimension).
        feature_dim: width of each hashed field embedding inside a tower.
        hidden: hidden layer widths of each tower's MLP.
        user_encoder: hashed buckets and slots of the user-side fields (slot 1, reserved
            for ``item_id`` by :class:`~learners.encoding.FeatureEncoder`, stays empty).
        item_encoder: hashed buckets and slots of the item-side fields (slot 0 stays empty).
        item_prefix: fields starting with it (and ``item_id``) go to the item tower.
        exclude_fields: fields neither tower sees (``position`` is a display bias, not a
            preference, and is unknown at retrieval time).
        temperature: softmax temperature on cosines (> 0).
        loss: "sampled_softmax" (in-batch with logQ correction) or "info_nce".
        remove_accidental_hits: with ``sampled_softmax``, leave a row's own positive item
            out of its negatives (its other in-batch clicks and hard negatives stay).
        batch_size: clicks per optimiser step; a larger batch is split.
        lr: Adam learning rate.
        max_hard_share: final share of hard negatives among a row's negatives, in [0, 0.5];
            0 (the default) turns hard negatives off. Measured honestly
            (``bench.retrieval_ablation``, history world, 3 seeds): caps 0.1 / 0.25 / 0.5
            with ramps of 0 / 5k / 20k clicks gave recall@10 0.176-0.189 against 0.185
            without, all within seed noise (std ~0.01), so they are off by default.
        ramp_examples: clicks over which the hard share ramps from 0 to ``max_hard_share``
            (0: no ramp).
        n_hard: most hard negatives asked for per click.
        uniform_negatives: items drawn per step uniformly from the remembered catalogue
            (every item of a learned row, clicked or not, up to ``max_items``) and added to
            the negatives: mixed negative sampling (Yang et al. 2020). In-batch negatives
            are only ever clicked items, so an item that is shown but never clicked in
            training is never scored down and can end up retrieved for every user (on the
            MovieLens dev log recall@10 fell below random without them). With
            ``sampled_softmax`` every logit is corrected by the log of the probability
            that its item is among the negatives (``TwoTowerModel._log_inclusion``).
            0 turns them off.
        popularity_width: columns of the count-min sketch of click counts (per row; 4 rows).
        popularity_half_life: clicks after which a click counts half in ``q``.
        max_items: items whose latest item-side features are remembered (least recently
            seen dropped first), so ``item_vectors(ids)`` embeds them with their features.
        grad_clip_norm: gradient norm clip.
        device: "auto" (cuda when available), "cpu", "cuda", ...
        behaviour_len: how many of the row's ``hist_seq`` items (most recent first) the user
            tower reads (:class:`HistoryPool`); 0: no behaviour. A config dict written
            before this setting existed loads with 0 (its checkpoint has no pool).
        behaviour_pool: how :class:`HistoryPool` summarises the sequence: "mean" (learned
            age-bucket weights) or "attention" (candidate-free self-attention: the most
            recent item, through a learned projection, queries the sequence; its output
            and the most recent item both reach the tower, SASRec-style last position) or
            "item_tower" (the sequence's items through the item tower, with their remembered
            attributes, pooled like "mean", plus the most recent one).
    """

    embedding_dim: int = 32
    feature_dim: int = 16
    hidden: tuple[int, ...] = (64,)
    user_encoder: EncoderConfig = field(default_factory=_user_encoder)
    item_encoder: EncoderConfig = field(default_factory=_item_encoder)
    item_prefix: str = "item_"
    exclude_fields: tuple[str, ...] = ("position",)
    temperature: float = 0.05
    loss: str = "sampled_softmax"
    remove_accidental_hits: bool = True
    batch_size: int = 512
    lr: float = 0.03
    # Off: on the history world no cap (0.1-0.5) or ramp (0-20k clicks) raised recall@10
    # beyond seed noise (bench/results/retrieval_ablation.json).
    max_hard_share: float = 0.0
    ramp_examples: int = 50_000
    n_hard: int = 2
    uniform_negatives: int = 64
    popularity_width: int = 2**16
    popularity_half_life: float = 200_000.0
    max_items: int = 200_000
    grad_clip_norm: float = 10.0
    device: str = "auto"
    behaviour_len: int = 20
    behaviour_pool: str = "mean"

    def __post_init__(self) -> None:
        if self.behaviour_len < 0:
            raise ValueError(f"behaviour_len must be >= 0, got {self.behaviour_len}")
        if self.behaviour_pool not in BEHAVIOUR_POOLS:
            raise ValueError(
                f"behaviour_pool must be one of {BEHAVIOUR_POOLS}, got {self.behaviour_pool!r}"
            )
        if self.embedding_dim < 1 or self.feature_dim < 1:
            raise ValueError(
                f"embedding_dim and feature_dim must be >= 1, got {self.embedding_dim}, "
                f"{self.feature_dim}"
            )
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {self.hidden}")
        if self.loss not in TWO_TOWER_LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {TWO_TOWER_LOSSES}")
        if not 0.0 <= self.max_hard_share <= 0.5:
            raise ValueError(f"max_hard_share must be in [0, 0.5], got {self.max_hard_share}")
        for name in ("temperature", "lr", "grad_clip_norm", "popularity_half_life"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name in ("batch_size", "popularity_width", "max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ramp_examples < 0 or self.n_hard < 0 or self.uniform_negatives < 0:
            raise ValueError(
                "ramp_examples, n_hard and uniform_negatives must be >= 0, got "
                f"{self.ramp_examples}, {self.n_hard}, {self.uniform_negatives}"
            )
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "exclude_fields", tuple(self.exclude_fields))

    def to_dict(self) -> dict[str, Any]:
        """Plain containers only (lists, not tuples) so it loads with ``weights_only``."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["exclude_fields"] = list(self.exclude_fields)
        for enc in ("user_encoder", "item_encoder"):
            d[enc]["categorical_keys"] = list(d[enc]["categorical_keys"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TwoTowerConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d.setdefault("behaviour_len", 0)  # written before the behaviour tower
        d.setdefault("uniform_negatives", 0)  # written before mixed negative sampling
        for enc in ("user_encoder", "item_encoder"):
            if enc in d:
                e = dict(d[enc])
                e.setdefault("max_seq_len", 0)
                e["categorical_keys"] = tuple(e.get("categorical_keys", ()))
                d[enc] = EncoderConfig(**e)
        for key in ("hidden", "exclude_fields"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class Tower(nn.Module):
    """Hashed field embeddings -> MLP -> L2-normalised ``(B, out_dim)`` vectors.

    ``cat``: int64 ``(B, Fc)`` bucket ids (0 = absent), ``num``: float32 ``(B, Fn)``.
    The output layer's bias starts small and random, so a row with no known field still
    gets a unit vector (a zero vector cannot be normalised). ``extra_dim > 0``: ``forward``
    also takes ``extra`` float32 ``(B, extra_dim)`` (e.g. a :class:`HistoryPool` output),
    which joins the MLP's input and reaches the output through a linear skip as well.

    Example:
        >>> t = Tower(100, 3, 1, feature_dim=4, hidden=(8,), out_dim=5,
        ...           generator=torch.Generator().manual_seed(0))
        >>> v = t(torch.tensor([[5, 0, 7], [0, 0, 0]]), torch.zeros(2, 1)).detach()
        >>> v.shape, [round(float(n), 4) for n in v.norm(dim=1)]
        (torch.Size([2, 5]), [1.0, 1.0])
    """

    def __init__(
        self,
        num_buckets: int,
        num_cat_fields: int,
        num_num_fields: int,
        feature_dim: int,
        hidden: tuple[int, ...],
        out_dim: int,
        generator: torch.Generator | None = None,
        extra_dim: int = 0,
    ) -> None:
        super().__init__()
        # Sparse gradients: a step touches only the rows of the batch (lazy Adam), not the
        # whole table, which a dense Adam step over 2^18 rows would (~0.1 s on 2 cores).
        self.embedding = nn.Embedding(num_buckets, feature_dim, padding_idx=0, sparse=True)
        layers: list[nn.Module] = []
        width = num_cat_fields * feature_dim + num_num_fields + extra_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_dim)
        self.skip = nn.Linear(extra_dim, out_dim, bias=False) if extra_dim else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Small normal embeddings (padding row zero), Xavier weights, zero hidden biases."""
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, 0.0, _EMB_STD, generator=generator)
            self.embedding.weight[0].zero_()
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight, generator=generator)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            nn.init.normal_(self.out.bias, 0.0, 0.01, generator=generator)

    def forward(self, cat: Tensor, num: Tensor, extra: Tensor | None = None) -> Tensor:
        """``cat`` (B, Fc), ``num`` (B, Fn), ``extra`` (B, extra_dim) when built with one
        -> (B, out_dim) unit vectors."""
        x = self.embedding(cat).flatten(1)
        if num.shape[1]:
            x = torch.cat([x, num], dim=1)
        if self.skip is None:
            return F.normalize(self.out(self.mlp(x)), dim=-1)
        if extra is None:
            raise ValueError("this tower was built with extra_dim > 0 and needs `extra`")
        x = torch.cat([x, extra], dim=1)
        return F.normalize(self.out(self.mlp(x)) + self.skip(extra), dim=-1)


class HistoryPool(nn.Module):
    """Age-weighted mean direction of a behaviour sequence's item embeddings, plus its log
    length.

    ``seq``: int64 ``(B, N)`` item buckets (0 = padding), ``seq_age``: float32 ``(B, N)``
    seconds (-1 unknown), ``table``: the item id embedding ``(num_buckets, F)`` ->
    ``(B, F + 1)``: ``normalize(sum_j softmax_j(a[age_bucket_j]) e(seq_j))`` over the valid
    positions (``a`` learned, one logit per age bucket of
    :func:`learners.models.age_buckets`, starting equal: a plain mean) and
    ``log1p(#valid)``. No valid position: all zeros.

    ``mode="attention"`` (width ``dim`` = F): the logits gain ``4 cos(W e(seq_0), e(seq_j))``
    (the most recent item, projected by a learned ``W`` starting at the identity, queries
    the sequence; no candidate, so the user vector can be indexed) and the output is
    ``(B, 2F + 1)``: the pooled direction, the most recent item's direction, the log length.

    ``mode="item_tower"`` (width ``dim`` = D): ``table`` is the ``(B, N, D)`` item-tower
    vectors of the sequence's items (with their remembered attributes, zeros at padding),
    pooled as in "mean"; the output is ``(B, 2D + 1)`` as in "attention".

    Example:
        >>> pool = HistoryPool()
        >>> table = nn.Embedding(10, 2, padding_idx=0)
        >>> with torch.no_grad():
        ...     _ = table.weight.copy_(torch.arange(20.0).reshape(10, 2))
        >>> out = pool(torch.tensor([[1, 3, 0], [0, 0, 0]]), torch.zeros(2, 3), table)
        >>> [[round(float(v), 4) for v in row] for row in out.detach()]  # (4, 5) / |(4, 5)|, log 3
        [[0.6247, 0.7809, 1.0986], [0.0, 0.0, 0.0]]
    """

    def __init__(self, mode: str = "mean", dim: int = 0) -> None:
        super().__init__()
        if mode not in BEHAVIOUR_POOLS:
            raise ValueError(f"mode must be one of {BEHAVIOUR_POOLS}, got {mode!r}")
        if mode != "mean" and dim < 1:
            raise ValueError(f"the {mode} pool needs the embedding width dim >= 1")
        self.mode = mode
        self.age_logits = nn.Parameter(torch.zeros(N_AGE_BUCKETS))
        self.query: nn.Linear | None = None
        if mode == "attention":
            self.query = nn.Linear(dim, dim, bias=False)
            with torch.no_grad():
                self.query.weight.copy_(torch.eye(dim))

    def out_dim(self, dim: int) -> int:
        """Output width for an embedding table of width ``dim``."""
        return dim + 1 if self.mode == "mean" else 2 * dim + 1

    def forward(self, seq: Tensor, seq_age: Tensor, table: nn.Embedding | Tensor) -> Tensor:
        valid = seq > 0
        logits = self.age_logits[age_buckets(seq, seq_age)].masked_fill(~valid, -math.inf)
        emb = table(seq) if isinstance(table, nn.Embedding) else table  # (B, N, F)
        last = emb[:, 0]  # most recent first; zeros (padding row) without history
        if self.query is not None:
            # Candidate-free attention: unit-scaled dot products of the most recent item's
            # projected direction with each item's direction (the raw embeddings start tiny).
            q = F.normalize(self.query(last), dim=-1)
            keys = F.normalize(emb, dim=-1)
            logits = logits + 4.0 * (keys * q[:, None, :]).sum(-1)
        any_valid = valid.any(1, keepdim=True)
        # A row with no valid position would softmax -inf everywhere (NaN): give it zeros.
        w = torch.softmax(torch.where(any_valid, logits, 0.0), dim=1) * any_valid
        # Unit length (zero without history): the id embeddings start tiny (std 0.05) and a
        # raw mean would enter the tower as noise; one pass over 10k clicks of the test's
        # drifting-taste world reached recall@10 0.34 with it, 0.28 without.
        pooled = F.normalize((w[:, :, None] * emb).sum(1), dim=1)
        length = torch.log1p(valid.sum(1, keepdim=True).float())
        if self.mode == "mean":
            return torch.cat([pooled, length], dim=1)
        return torch.cat([pooled, F.normalize(last, dim=-1), length], dim=1)


class _PopularitySketch:
    """Decayed click counts per item in a count-min sketch (4 rows x ``width``).

    ``log_q(items)`` is the log of an item's share of the decayed clicks, its count floored
    at one click (an item never clicked is treated as clicked once).
    """

    _DEPTH = 4
    _PRIME = (1 << 61) - 1

    def __init__(self, width: int, half_life: float) -> None:
        self.width = width
        self.decay = 0.5 ** (1.0 / half_life)  # per click
        self.table = np.zeros((self._DEPTH, width), dtype=np.float64)
        self.total = 0.0
        # Fixed odd multipliers/offsets: a pairwise-independent family over crc32 keys.
        self._a = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F], dtype=np.uint64)
        self._b = np.array([0x165667B1, 0xD3A2646C, 0xFD7046C5, 0xB55A4F09], dtype=np.uint64)

    def _columns(self, items: Sequence[str]) -> np.ndarray:
        keys = np.fromiter(
            (zlib.crc32(str(i).encode("utf-8")) for i in items), dtype=np.uint64, count=len(items)
        )
        h = (self._a[:, None] * keys[None, :] + self._b[:, None]) % np.uint64(self._PRIME)
        return (h % np.uint64(self.width)).astype(np.int64)  # (4, N)

    def update(self, items: Sequence[str]) -> None:
        if not items:
            return
        f = self.decay ** len(items)
        self.table *= f
        self.total = self.total * f + len(items)
        cols = self._columns(items)
        for d in range(self._DEPTH):
            np.add.at(self.table[d], cols[d], 1.0)

    def log_q(self, items: Sequence[str]) -> np.ndarray:
        """(N,) float64 natural-log click share of each item."""
        if not items:
            return np.zeros(0, dtype=np.float64)
        cols = self._columns(items)
        est = self.table[np.arange(self._DEPTH)[:, None], cols].min(axis=0)
        return np.log(np.maximum(est, 1.0)) - math.log(max(self.total, 1.0))


class TwoTowerModel:
    """Two-tower retrieval model with the shared learner interface.

    Only clicked rows are learned from (see the module docstring). ``hard_negatives`` is
    an optional callable ``(user_id, n) -> list[item_id]`` given to the constructor (or to
    :meth:`load` / :meth:`from_state`; it is not saved, nor copied by :meth:`clone`).
    After each step, ``hard_share`` is the realised share of hard negatives among a row's
    negatives, ``target_hard_share`` the curriculum's target, and ``mean_hard_score`` /
    ``mean_random_score`` the mean cosine between users and their hard / in-batch (random)
    negatives: hard scores far above random ones while recall stalls suggest the pool
    holds unlabelled positives.

    Example:
        >>> cfg = TwoTowerConfig(embedding_dim=8, device="cpu",
        ...                      user_encoder=EncoderConfig(num_buckets=512, max_num_fields=0),
        ...                      item_encoder=EncoderConfig(num_buckets=512))
        >>> model = TwoTowerModel(cfg, seed=0)
        >>> rows = [{"user_id": f"u{i}", "item_id": f"i{i}", "position": 1} for i in range(4)]
        >>> model.learn_many(rows, np.array([1, 1, 0, 1]))
        >>> model.n_updates, model.n_examples
        (1, 3)
        >>> model.user_vectors(["u1", "u2"]).shape, model.item_vectors(["i1"]).dtype
        ((2, 8), dtype('float32'))
        >>> p = model.predict_proba_many(rows)  # (1 + cosine) / 2
        >>> p.shape, bool(((p >= 0) & (p <= 1)).all())
        ((4,), True)
    """

    def __init__(
        self,
        config: TwoTowerConfig = TwoTowerConfig(),  # noqa: B008 - frozen, immutable default
        seed: int = 0,
        hard_negatives: HardNegativeSource | None = None,
    ) -> None:
        self.config = config
        self.seed = seed
        self.device = pick_device(config.device)
        self.user_encoder = FeatureEncoder(config.user_encoder)
        self.item_encoder = FeatureEncoder(config.item_encoder)
        gen = torch.Generator().manual_seed(seed)
        ue, ie = config.user_encoder, config.item_encoder
        dims = (config.feature_dim, config.hidden, config.embedding_dim)
        pool_dim = (
            config.embedding_dim if config.behaviour_pool == "item_tower" else config.feature_dim
        )
        history = HistoryPool(config.behaviour_pool, pool_dim) if config.behaviour_len else None
        extra = history.out_dim(pool_dim) if history is not None else 0
        self.user_tower = Tower(
            ue.num_buckets, ue.max_cat_fields, ue.max_num_fields, *dims, gen, extra_dim=extra
        )
        self.item_tower = Tower(ie.num_buckets, ie.max_cat_fields, ie.max_num_fields, *dims, gen)
        towers: dict[str, nn.Module] = {"user": self.user_tower, "item": self.item_tower}
        self.history: HistoryPool | None = history
        if history is not None:
            towers["history"] = history
        self.model = nn.ModuleDict(towers)
        self.model.to(self.device)
        fused = self.device.type in ("cpu", "cuda")
        tables = [self.user_tower.embedding.weight, self.item_tower.embedding.weight]
        dense = [p for p in self.model.parameters() if all(p is not t for t in tables)]
        self._dense_params = dense
        self.optimizer = torch.optim.Adam(dense, lr=config.lr, fused=fused)
        self.sparse_optimizer = torch.optim.SparseAdam(tables, lr=config.lr)
        self.popularity = _PopularitySketch(config.popularity_width, config.popularity_half_life)
        self._item_features: OrderedDict[str, dict[str, object]] = OrderedDict()
        self._catalogue: list[str] = []  # the remembered items, for uniform draws
        self._slot: dict[str, int] = {}  # item -> its index in _catalogue
        self.hard_negatives: HardNegativeSource | None = hard_negatives
        self.n_updates = 0
        self.n_examples = 0  # clicks passed to a step: the curriculum's clock
        self.n_skipped_nonfinite = 0
        self.last_loss: float | None = None
        self.hard_share = 0.0
        self.mean_hard_score: float | None = None
        self.mean_random_score: float | None = None

    # -- feature split ---------------------------------------------------------------------
    def _is_item_field(self, key: str) -> bool:
        return key == "item_id" or key.startswith(self.config.item_prefix)

    def _user_part(self, row: Mapping[str, object]) -> dict[str, object]:
        excluded = self.config.exclude_fields
        out: dict[str, object] = {}
        for key, value in row.items():
            if value is None or key in excluded or self._is_item_field(key):
                continue
            if key == "user_id" or isinstance(value, str):
                out[key] = value
        return out

    def _item_part(self, row: Mapping[str, object]) -> dict[str, object]:
        excluded = self.config.exclude_fields
        return {
            k: v
            for k, v in row.items()
            if v is not None and k not in excluded and self._is_item_field(k)
        }

    def _remember_item(self, part: dict[str, object]) -> None:
        """Remember an item (LRU over ``max_items``) and its latest item-side features; an
        item seen without features keeps the ones it had."""
        item = str(part["item_id"])
        known = self._item_features.get(item)
        if len(part) > 1:
            # Plain str/float values only, so the store loads with weights_only=True.
            self._item_features[item] = {
                k: v if isinstance(v, str) else float(v)  # type: ignore[arg-type]  # numeric
                for k, v in part.items()
                if k != "item_id"
            }
        elif known is None:
            self._item_features[item] = {}
        if known is None:
            self._slot[item] = len(self._catalogue)
            self._catalogue.append(item)
        else:
            self._item_features.move_to_end(item)
        if len(self._item_features) > self.config.max_items:
            gone, _ = self._item_features.popitem(last=False)
            at = self._slot.pop(gone)
            last = self._catalogue.pop()
            if last != gone:  # swap-remove keeps the sampling list dense, O(1)
                self._catalogue[at] = last
                self._slot[last] = at

    def _draw_uniform(self, taken: set[str]) -> list[str]:
        """Up to ``uniform_negatives`` distinct remembered items, uniformly, none in
        ``taken``; seeded by (seed, n_updates), so a reloaded model draws the same ones."""
        n, size = self.config.uniform_negatives, len(self._catalogue)
        if n == 0 or size == 0:
            return []
        rng = np.random.default_rng((self.seed, self.n_updates))
        picks = rng.choice(size, min(n, size), replace=False)
        return [it for it in (self._catalogue[int(i)] for i in picks) if it not in taken]

    def _item_rows(self, item_ids: Sequence[str]) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for item in item_ids:
            feats = self._item_features.get(item)
            rows.append({"item_id": item} if feats is None else {"item_id": item, **feats})
        return rows

    # -- towers ----------------------------------------------------------------------------
    def _embed(self, tower: str, encoder: FeatureEncoder, parts: Rows, rows: Rows = ()) -> Tensor:
        """Tower vectors of ``parts``; for the user tower with behaviour, ``rows`` (the full
        rows, aligned with ``parts``) carry the ``hist_seq`` it reads."""
        batch = encoder.encode(parts)
        cat = torch.from_numpy(batch.cat).to(self.device, non_blocking=True)
        num = torch.from_numpy(batch.num).to(self.device, non_blocking=True)
        if tower != "user":
            return self.item_tower(cat, num)
        extra = None
        if self.history is not None:
            # Hashed by the item encoder: the same buckets (rows) as the item tower's ids.
            seq, age = self.item_encoder.encode_sequence(rows, self.config.behaviour_len)
            seq_t = torch.from_numpy(seq).to(self.device, non_blocking=True)
            age_t = torch.from_numpy(age).to(self.device, non_blocking=True)
            table: nn.Embedding | Tensor = self.item_tower.embedding
            if self.history.mode == "item_tower":
                table = self._sequence_item_vectors(rows, seq)
            extra = self.history(seq_t, age_t, table)
        out: Tensor = self.user_tower(cat, num, extra)
        return out

    def _sequence_item_vectors(self, rows: Rows, seq: np.ndarray) -> Tensor:
        """``(B, N, D)`` item-tower vectors of the rows' ``hist_seq`` items where ``seq``
        (from :meth:`FeatureEncoder.encode_sequence`) is valid, zeros elsewhere; each
        distinct item is embedded once, with its remembered attributes."""
        b, n = seq.shape
        index = np.zeros((b, n), dtype=np.int64)  # 0: padding; distinct items from 1
        distinct: dict[str, int] = {}
        for i, row in enumerate(rows):
            items = row.get(SEQ_FIELD)
            if not seq[i, 0] or not isinstance(items, Sequence | np.ndarray):
                continue
            ids = [str(x) for x in items if x is not None and type(x) is not bool][:n]
            for j, item in enumerate(ids):
                if not seq[i, j]:
                    break
                index[i, j] = distinct.setdefault(item, len(distinct) + 1)
        dim = self.config.embedding_dim
        if not distinct:
            return torch.zeros(b, n, dim, device=self.device)
        vectors = self._items(self._item_rows(list(distinct)))
        table = torch.cat([torch.zeros(1, dim, device=self.device), vectors])
        return table[torch.from_numpy(index).to(self.device)]

    def _users(self, rows: Rows) -> Tensor:
        parts = [self._user_part(r) for r in rows]
        return self._embed("user", self.user_encoder, parts, rows)

    def _items(self, parts: Rows) -> Tensor:
        return self._embed("item", self.item_encoder, parts)

    def _vectors(self, tower: str, parts: list[dict[str, object]], rows: Rows = ()) -> np.ndarray:
        dim = self.config.embedding_dim
        if not parts:
            return np.zeros((0, dim), dtype=np.float32)
        enc = self.user_encoder if tower == "user" else self.item_encoder
        self.model.eval()
        chunks = []
        with torch.no_grad():
            for s in range(0, len(parts), _VECTOR_CHUNK):
                part, row = parts[s : s + _VECTOR_CHUNK], rows[s : s + _VECTOR_CHUNK]
                chunks.append(self._embed(tower, enc, part, row).cpu())
        return torch.cat(chunks).numpy().astype(np.float32)

    @inference  # serving cannot change the model: no new slots
    def user_vectors(self, rows_or_ids: Sequence[str] | Rows) -> np.ndarray:
        """User-tower vectors, float32 ``(N, D)``, unit norm.

        ``rows_or_ids``: user ids (no context, no history) or rows (user id plus context
        fields and the ``hist_seq`` / ``hist_seq_age`` behaviour, as in :meth:`learn_many`;
        item fields are ignored).
        """
        rows = [{"user_id": r} if isinstance(r, str) else r for r in rows_or_ids]
        return self._vectors("user", [self._user_part(r) for r in rows], rows)

    @inference  # serving cannot change the model: no new slots
    def item_vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """Item-tower vectors, float32 ``(M, D)``, unit norm; each item with its latest
        remembered item-side features (id only for an item never seen with features)."""
        return self._vectors("item", self._item_rows([str(i) for i in item_ids]))

    @inference  # serving cannot change the model: no new slots
    def catalogue_vectors(self, rows: Rows, batch_size: int = _VECTOR_CHUNK) -> np.ndarray:
        """Item-tower vectors of catalogue rows, float32 ``(M, D)``, unit norm, for an index
        refresh over items the model may never have seen clicked.

        ``rows``: one mapping per item with ``item_id`` and its ``item_*`` fields (other
        fields are ignored); encoded and embedded ``batch_size`` rows per forward pass, so
        memory stays O(batch_size) beyond the output. The remembered item features
        (:meth:`item_vectors`) are neither read nor changed.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(rows), self.config.embedding_dim), dtype=np.float32)
        self.model.eval()
        with torch.no_grad():
            for s in range(0, len(rows), batch_size):
                parts = [self._item_part(r) for r in rows[s : s + batch_size]]
                if any("item_id" not in p for p in parts):
                    raise ValueError("every catalogue row needs an item_id")
                out[s : s + len(parts)] = self._items(parts).cpu().numpy()
        return out

    # -- learner interface -----------------------------------------------------------------
    @inference  # serving cannot change the model: no new slots
    def predict_proba_many(self, X: Rows) -> np.ndarray:
        """Affinity ``(1 + cos(user, item)) / 2``, float64 ``(B,)`` in [0, 1].

        A monotone rescaling of the retrieval score, NOT a click probability (retrieval is
        trained on clicks only, so nothing anchors its level); rank with it, and take pCTR
        from the ranker and calibrator.
        """
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        self.model.eval()
        with torch.no_grad():
            u = self._users(X)
            v = self._items([self._item_part(r) for r in X])
            cos = (u * v).sum(-1).clamp(-1.0, 1.0)
        return ((1.0 + cos.cpu().numpy().astype(np.float64)) / 2.0).clip(0.0, 1.0)

    def learn_many(self, X: Rows, y: Any, w: Any = None) -> None:
        """Learn from the clicked rows of a labelled batch.

        ``X``: B rows; ``y``: (B,) labels, a row is a positive when ``y > 0`` (non-finite
        labels or weights drop the row); ``w``: optional (B,) example weights. Rows without
        ``item_id`` are skipped. Clicks are learned in steps of at most ``batch_size``.
        """
        y_arr, w_arr = labels_and_weights(X, y, w)
        for row in X:  # every shown item joins the catalogue the uniform negatives come from
            if row.get("item_id") is not None:
                self._remember_item(self._item_part(row))
        ok = np.isfinite(y_arr) & np.isfinite(w_arr) & (y_arr > 0) & (w_arr > 0)
        pos = [i for i in np.flatnonzero(ok).tolist() if X[i].get("item_id") is not None]
        bs = self.config.batch_size
        for s in range(0, len(pos), bs):
            chunk = pos[s : s + bs]
            self._step([X[i] for i in chunk], w_arr[chunk])

    def score_and_learn(self, X: Rows, y: Any, w: Any = None) -> np.ndarray:
        """Progressive validation: :meth:`predict_proba_many` BEFORE learning the batch."""
        p = self.predict_proba_many(X)
        self.learn_many(X, y, w)
        return p

    @property
    def target_hard_share(self) -> float:
        """The curriculum's hard-negative share now: linear in clicks learned, capped."""
        cfg = self.config
        if cfg.ramp_examples == 0:
            return cfg.max_hard_share
        return cfg.max_hard_share * min(1.0, self.n_examples / cfg.ramp_examples)

    def _draw_hard(
        self, users: list[str | None], n_random: int, batch_items: set[str]
    ) -> tuple[list[str], list[int]]:
        """Hard negatives for this step and the row that asked for each one.

        At most ``floor(s / (1 - s) * n_random)`` of them (``s`` = target share), so that
        hard / (hard + random) never exceeds ``s``; at most ``n_hard`` per click; items
        already in the batch are dropped (they are in-batch negatives already).
        """
        share = self.target_hard_share
        if self.hard_negatives is None or share <= 0.0 or n_random <= 0 or self.config.n_hard == 0:
            return [], []
        budget = min(
            math.floor(share / (1.0 - share) * n_random + 1e-9), self.config.n_hard * len(users)
        )
        if budget <= 0:
            return [], []
        per_row = min(self.config.n_hard, -(-budget // len(users)))
        items: list[str] = []
        owners: list[int] = []
        taken: set[str] = set()
        for row, user in enumerate(users):
            if len(items) >= budget:
                break
            if user is None:
                continue
            for item in self.hard_negatives(user, min(per_row, budget - len(items))):
                item = str(item)
                if item in batch_items or item in taken:
                    continue
                taken.add(item)
                items.append(item)
                owners.append(row)
        return items[:budget], owners[:budget]

    def _step(self, rows: list[Mapping[str, object]], weights: np.ndarray) -> None:
        cfg = self.config
        item_parts = [self._item_part(r) for r in rows]  # remembered by learn_many already
        items = [str(p["item_id"]) for p in item_parts]
        users = [None if r.get("user_id") is None else str(r["user_id"]) for r in rows]
        self.popularity.update(items)
        b = len(rows)
        first: dict[str, int] = {}
        for i, item in enumerate(items):
            first.setdefault(item, i)
        n_random = (len(first) if cfg.loss == "sampled_softmax" else b) - 1
        hard, owners = self._draw_hard(users, n_random, set(first))
        self.hard_share = len(hard) / (len(hard) + n_random) if hard else 0.0

        self.model.train()
        u = self._users(rows)  # (B, D)
        k = self._items(item_parts)  # (B, D)
        h = self._items(self._item_rows(hard)) if hard else k[:0]  # (H, D)
        uni = self._draw_uniform(set(first) | set(hard))
        r = self._items(self._item_rows(uni)) if uni else k[:0]  # (R, D)
        tau = cfg.temperature
        if cfg.loss == "info_nce":
            per = info_nce_loss(u, torch.cat([k, h, r]), tau, reduction="none")
        else:
            uniq = list(first.values())
            neg_items = [items[i] for i in uniq] + hard + uni
            log_q_pos = torch.from_numpy(self._log_inclusion(items, b, len(uni)))
            log_q_neg = torch.from_numpy(self._log_inclusion(neg_items, b, len(uni)))
            neg = torch.cat([k[uniq], h, r])
            exclude = None
            if cfg.remove_accidental_hits:
                # A row's own item is among the negatives once, at its first in-batch
                # position (hard and uniform negatives never repeat a batch item): O(B).
                column = {item: c for c, item in enumerate(neg_items[: len(uniq)])}
                exclude = torch.zeros(b, len(neg_items), dtype=torch.bool, device=self.device)
                exclude[torch.arange(b), torch.tensor([column[it] for it in items])] = True
            per = sampled_softmax_loss(
                u, k, neg, log_q_pos.to(self.device), log_q_neg.to(self.device), tau,
                reduction="none", exclude=exclude,
            )  # fmt: skip
        wt = torch.from_numpy(np.asarray(weights, dtype=np.float32)).to(self.device)
        loss = (per * wt).mean()
        self._record_scores(u, k, h, items, owners)
        self._apply(loss)
        self.n_examples += b

    def _log_inclusion(self, items: Sequence[str], n_rows: int, n_uniform: int) -> np.ndarray:
        """(N,) log of the probability that each item is among a step's negatives, each
        listed once: in the batch (``n_rows`` clicks drawn in proportion to click share
        ``q``) or among the ``n_uniform`` uniform draws from the ``M`` remembered items,
        ``pi = 1 - (1 - q)^n_rows (1 - n_uniform / M)``. Subtracting ``log pi`` makes the
        sampled partition sum an unbiased estimate of the full one; for rare items and no
        uniform draws it is ``log q`` plus a constant (the softmax ignores the constant),
        and when the draws cover the catalogue it is 0: the full softmax."""
        q = np.exp(self.popularity.log_q(items))
        miss_uniform = 1.0 - min(1.0, n_uniform / max(len(self._catalogue), 1))
        if miss_uniform <= 0.0:
            return np.zeros(len(items), dtype=np.float64)
        log_miss = n_rows * np.log1p(-np.minimum(q, 1.0 - 1e-12)) + math.log(miss_uniform)
        return np.log(-np.expm1(log_miss))

    def _record_scores(
        self, u: Tensor, k: Tensor, h: Tensor, items: list[str], owners: list[int]
    ) -> None:
        with torch.no_grad():
            ud, kd = u.detach(), k.detach()
            sims = ud @ kd.T  # (B, B)
            ids = np.asarray(items, dtype=object)
            other = torch.from_numpy(ids[:, None] != ids[None, :]).to(self.device)
            n_other = int(other.sum())
            self.mean_random_score = (
                float((sims * other).sum() / n_other) if n_other else self.mean_random_score
            )
            if owners:
                own = torch.as_tensor(owners, device=self.device)
                self.mean_hard_score = float((ud[own] * h.detach()).sum(-1).mean())

    def _apply(self, loss: Tensor) -> None:
        """One Adam step (dense layers clipped to ``grad_clip_norm``; the embedding rows of
        the batch by lazy SparseAdam); a non-finite loss or gradient skips it, counted."""
        optimizers = [self.optimizer, self.sparse_optimizer]
        if not guarded_step(loss, self._dense_params, self.config.grad_clip_norm, optimizers):
            self.n_skipped_nonfinite += 1
            return
        self.n_updates += 1
        self.last_loss = float(loss.detach())

    def clone(self) -> TwoTowerModel:
        """An untrained copy with the same config and seed (no ``hard_negatives`` source)."""
        return TwoTowerModel(self.config, seed=self.seed)

    # -- persistence -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything :meth:`save` writes; plain containers and tensors only."""
        return {
            "config": self.config.to_dict(),
            "seed": self.seed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sparse_optimizer": self.sparse_optimizer.state_dict(),
            "user_encoder": self.user_encoder.state_dict(),
            "item_encoder": self.item_encoder.state_dict(),
            "popularity": torch.from_numpy(self.popularity.table.copy()),
            "popularity_total": self.popularity.total,
            "item_features": [[k, dict(v)] for k, v in self._item_features.items()],
            "catalogue": list(self._catalogue),  # the uniform draws' order
            "n_updates": self.n_updates,
            "n_examples": self.n_examples,
            "n_skipped_nonfinite": self.n_skipped_nonfinite,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write a checkpoint (see :func:`atomic_torch_save`)."""
        atomic_torch_save(self.state(), path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | None = None,
        hard_negatives: HardNegativeSource | None = None,
    ) -> TwoTowerModel:
        """Load a checkpoint written by :meth:`save` (``torch.load(weights_only=True)``),
        optionally onto another ``device``; the ``hard_negatives`` source is not in a
        checkpoint (it is the indexer's), so it is given here."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_state(state, device=device, hard_negatives=hard_negatives)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        device: str | None = None,
        hard_negatives: HardNegativeSource | None = None,
    ) -> TwoTowerModel:
        """A model from :meth:`state` (see :meth:`load`). Without the ``optimizer`` keys (a
        serving snapshot, :mod:`modelstore.snapshot`) the optimiser moments start afresh."""
        config = TwoTowerConfig.from_dict(state["config"])
        if device is not None:
            config = dataclasses.replace(config, device=device)
        model = cls(config, seed=int(state["seed"]), hard_negatives=hard_negatives)
        model.model.load_state_dict(state["model"])
        if "optimizer" in state:
            model.optimizer.load_state_dict(state["optimizer"])
            model.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        model.user_encoder.load_state_dict(state["user_encoder"])
        model.item_encoder.load_state_dict(state["item_encoder"])
        model.popularity.table = state["popularity"].numpy().astype(np.float64)
        model.popularity.total = float(state["popularity_total"])
        model._item_features = OrderedDict((str(k), dict(v)) for k, v in state["item_features"])
        order = [str(i) for i in state.get("catalogue", ())]
        same = len(order) == len(model._item_features) and set(order) == set(model._item_features)
        model._catalogue = order if same else list(model._item_features)
        model._slot = {item: i for i, item in enumerate(model._catalogue)}
        model.n_updates = int(state["n_updates"])
        model.n_examples = int(state["n_examples"])
        model.n_skipped_nonfinite = int(state.get("n_skipped_nonfinite", 0))
        return model
