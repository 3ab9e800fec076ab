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
the model has seen shown (mixed negative sampling; hard and uniform ones are drawn by
:mod:`learners.negatives`). ``loss="sampled_softmax"`` subtracts from every logit the log
of the probability that its item is among the step's negatives (Yi et al. 2019's logQ
correction, :func:`learners.negatives.log_inclusion`; ``q``, the item's share of recent
clicks, from a decayed count-min sketch). Without it the model learns
``p(item | user) / q(item)`` and under-recommends popular items (hard negatives get the
same correction, so one scale holds for every logit).
``loss="info_nce"`` is the uncorrected in-batch softmax. ``sampled_softmax`` lists each
distinct item of the batch once as a negative and, with ``remove_accidental_hits`` (the
default), masks a row's own item out of its negatives (otherwise it appears twice and
bounds the loss below by log 2); ``info_nce`` counts another click on the same item as a
negative.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from learners.base import Rows, labels_and_weights
from learners.encoding import FeatureEncoder, inference
from learners.losses import info_nce_loss, sampled_softmax_loss
from learners.negatives import (
    HardNegativeSource,
    draw_hard,
    draw_uniform,
    log_inclusion,
    target_hard_share,
)
from learners.towers import (
    BEHAVIOUR_POOLS,
    ITEM_TOWER_POOLS,
    TWO_TOWER_LOSSES,
    HistoryPool,
    PopularitySketch,
    Tower,
    TwoTowerConfig,
    history_slots,
    item_part,
    negative_cosines,
    user_part,
)
from learners.training import (
    Checkpointed,
    build_module,
    guarded_step,
    pick_device,
    read_checkpoint,
    weights_to_load,
)

__all__ = [
    "BEHAVIOUR_POOLS",
    "TWO_TOWER_LOSSES",
    "HardNegativeSource",
    "HistoryPool",
    "TwoTowerConfig",
    "TwoTowerModel",
]

_VECTOR_CHUNK = 8192  # rows per forward pass in user_vectors / item_vectors


class TwoTowerModel(Checkpointed):
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
        >>> from learners.encoding import EncoderConfig
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
        on_items = config.behaviour_pool in ITEM_TOWER_POOLS
        pool_dim = config.embedding_dim if on_items else config.feature_dim

        def build() -> nn.ModuleDict:
            history = None
            if config.behaviour_len:
                history = HistoryPool(
                    config.behaviour_pool, pool_dim, config.behaviour_len,
                    layers=config.encoder_layers, heads=config.encoder_heads,
                    dropout=config.encoder_dropout, generator=gen,
                )  # fmt: skip
            extra = history.out_dim(pool_dim) if history is not None else 0
            towers: dict[str, nn.Module] = {
                "user": Tower(ue.num_buckets, ue.max_cat_fields, ue.max_num_fields, *dims, gen,
                              extra_dim=extra),
                "item": Tower(ie.num_buckets, ie.max_cat_fields, ie.max_num_fields, *dims, gen),
            }  # fmt: skip
            if history is not None:
                towers["history"] = history
            return nn.ModuleDict(towers)

        self.model = cast(nn.ModuleDict, build_module(build, self.device))
        self.user_tower = cast(Tower, self.model["user"])
        self.item_tower = cast(Tower, self.model["item"])
        self.history: HistoryPool | None = (
            cast(HistoryPool, self.model["history"]) if "history" in self.model else None
        )
        fused = self.device.type in ("cpu", "cuda")
        tables = [self.user_tower.embedding.weight, self.item_tower.embedding.weight]
        dense = [p for p in self.model.parameters() if all(p is not t for t in tables)]
        self._dense_params = dense
        self.optimizer = torch.optim.Adam(dense, lr=config.lr, fused=fused)
        self.sparse_optimizer = torch.optim.SparseAdam(tables, lr=config.lr)
        self.popularity = PopularitySketch(config.popularity_width, config.popularity_half_life)
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

    # -- remembered items ------------------------------------------------------------------
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
        n = self.config.uniform_negatives
        return draw_uniform(self._catalogue, n, self.seed, self.n_updates, taken)

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
            if self.history.mode in ITEM_TOWER_POOLS:
                table = self._sequence_item_vectors(rows, seq)
            extra = self.history(seq_t, age_t, table)
        out: Tensor = self.user_tower(cat, num, extra)
        return out

    def _sequence_item_vectors(self, rows: Rows, seq: np.ndarray) -> Tensor:
        """``(B, N, D)`` item-tower vectors of the rows' ``hist_seq`` items where ``seq``
        (from :meth:`FeatureEncoder.encode_sequence`) is valid, zeros elsewhere; each
        distinct item is embedded once, with its remembered attributes."""
        index, distinct = history_slots(rows, seq)
        dim = self.config.embedding_dim
        if not distinct:
            return torch.zeros(*seq.shape, dim, device=self.device)
        vectors = self._items(self._item_rows(distinct))
        table = torch.cat([torch.zeros(1, dim, device=self.device), vectors])
        return table[torch.from_numpy(index).to(self.device)]

    def _users(self, rows: Rows) -> Tensor:
        parts = [user_part(r, self.config) for r in rows]
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
        return self._vectors("user", [user_part(r, self.config) for r in rows], rows)

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
                parts = [item_part(r, self.config) for r in rows[s : s + batch_size]]
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
            v = self._items([item_part(r, self.config) for r in X])
            cos = (u * v).sum(-1).clamp(-1.0, 1.0)
        return ((1.0 + cos.cpu().numpy().astype(np.float64)) / 2.0).clip(0.0, 1.0)

    def learn_many(self, X: Rows, y: Any, w: Any = None) -> None:
        """Learn from the clicked rows of a labelled batch.

        ``X``: B rows; ``y``: (B,) labels, a row is a positive when ``y > 0`` (non-finite
        labels or weights drop the row); ``w``: optional (B,) example weights. Rows without
        ``item_id`` are skipped. Clicks are learned in steps of at most ``batch_size``.
        """
        y_arr, w_arr = labels_and_weights(X, y, w)
        parts: dict[int, dict[str, object]] = {}
        for i, row in enumerate(X):  # every shown item joins the uniform negatives' catalogue
            if row.get("item_id") is not None:
                parts[i] = item_part(row, self.config)
                self._remember_item(parts[i])
        ok = np.isfinite(y_arr) & np.isfinite(w_arr) & (y_arr > 0) & (w_arr > 0)
        pos = [i for i in np.flatnonzero(ok).tolist() if i in parts]
        bs = self.config.batch_size
        for s in range(0, len(pos), bs):
            chunk = pos[s : s + bs]
            self._step([X[i] for i in chunk], [parts[i] for i in chunk], w_arr[chunk])

    def score_and_learn(self, X: Rows, y: Any, w: Any = None) -> np.ndarray:
        """Progressive validation: :meth:`predict_proba_many` BEFORE learning the batch."""
        p = self.predict_proba_many(X)
        self.learn_many(X, y, w)
        return p

    @property
    def n_remembered(self) -> int:
        """Items remembered for the uniform negatives (at most ``max_items``)."""
        return len(self._catalogue)

    @property
    def target_hard_share(self) -> float:
        """The curriculum's hard-negative share now: linear in clicks learned, capped."""
        cfg = self.config
        return target_hard_share(cfg.max_hard_share, cfg.ramp_examples, self.n_examples)

    def _step(
        self,
        rows: list[Mapping[str, object]],
        item_parts: list[dict[str, object]],
        weights: np.ndarray,
    ) -> None:
        """One gradient step on clicked ``rows`` (B) and their item-side parts (B)."""
        cfg = self.config
        items = [str(p["item_id"]) for p in item_parts]
        users = [None if r.get("user_id") is None else str(r["user_id"]) for r in rows]
        self.popularity.update(items)
        b = len(rows)
        first: dict[str, int] = {}
        for i, item in enumerate(items):
            first.setdefault(item, i)
        n_random = (len(first) if cfg.loss == "sampled_softmax" else b) - 1
        share = self.target_hard_share
        hard, owners = draw_hard(
            self.hard_negatives, users, n_random, set(first), share, cfg.n_hard
        )
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
        random, hard_cos = negative_cosines(u, k, h, items, owners)
        if random is not None:  # None: no two clicks on different items in the batch
            self.mean_random_score = random
        if hard_cos is not None:
            self.mean_hard_score = hard_cos
        self._apply(loss)
        self.n_examples += b

    def _log_inclusion(self, items: Sequence[str], n_rows: int, n_uniform: int) -> np.ndarray:
        """(N,) log of the probability that each item is among a step's negatives
        (:func:`learners.negatives.log_inclusion` at the items' click shares)."""
        q = np.exp(self.popularity.log_q(items))
        return log_inclusion(q, n_rows, n_uniform, len(self._catalogue))

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
        return cls.from_state(read_checkpoint(path), device=device, hard_negatives=hard_negatives)

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
        with weights_to_load():  # every weight is loaded below: no random init
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
