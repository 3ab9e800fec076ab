"""The online PyTorch CTR ranker: encoder + model + Adam, with the River-style interface.

``X`` is a sequence of flat example dicts (see :mod:`learners.encoding`), ``y`` an array
``(B,)`` of 0/1 labels and ``w`` optional per-example weights ``(B,)``. ``y2`` (optional,
``model="mmoe"`` or ``"ple"`` only) is a ``(B,)`` second label (e.g. conversion) for task
1, NaN where unknown. Its settings, :class:`~learners.ranker_config.RankerConfig` and
:data:`~learners.ranker_config.MODELS`, live in :mod:`learners.ranker_config` and are
importable from here.

Device: ``RankerConfig.device="auto"`` trains on CUDA when it is available (host arrays
are copied through pinned memory with ``non_blocking=True``), else on the CPU.
``RankerConfig.amp`` runs the forward pass under bf16 autocast on CUDA only; on the CPU it
is ignored, so CPU results do not depend on it.

Calibration: the output bias starts at ``logit(prior_ctr)``; on the first learning step of
a fresh ranker it is re-centred on the batch's CTR, shrunk towards ``prior_ctr`` with
``bias_prior_strength`` pseudo-examples, before the gradient is taken (a cold model on a
0.4% CTR log otherwise spends thousands of examples predicting 3%). Losses whose minimiser
is not P(click) (``focal``, ``weighted_bce``) have their outputs mapped back to P(click)
(``loss_correction``, see :mod:`learners.links`); with ``fnc`` the probabilities then go
through the FNC link (:func:`learners.links.fnc_correct`), which neither the output bias's
start nor its re-centring sees (they follow the label rate the model learns).

Fallback (``RankerConfig.fallback_mixture``, on by default): the served probability is the
online model selection of :class:`learners.mixture.FallbackMixture` between the model and
the running base rate of the labels, weighted by each one's prequential log loss (each
batch is judged before the model learns from it). A cold model over many features on a
log with few clicks is then served about as well as the base rate (it is not worse than a
constant model by more than ``ln 2`` nats in all), and a model that has earned
``fallback_cap`` nats over it is served as is (weight ``1 - ~e^-cap``). The mixture is
monotone in the model's score, so rankings do not change. :meth:`predict_logit_many` gives
the model's raw logits, without it.

Delayed feedback (DFM, Chapelle 2014): with ``loss="dfm"`` (or ``RankerConfig.delay_head``)
the ranker carries a click-delay head (:class:`learners.models.DelayHead`, the log-rate of an
Exponential delay); ``learn_many`` / ``score_and_learn`` then take ``elapsed``: (B,) seconds,
the click delay of a label-1 row and the time a label-0 row was observed unclicked
(:func:`learners.losses.dfm_loss`). Without ``elapsed`` the labels are taken as final (BCE).
Scores are the click probability only; :meth:`TorchRanker.predict_delay_rate_many` gives
the head's rates. Its re-centred output bias targets the label rate, which on a censored
stream is a lower bound of the CTR (the gradient takes it from there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from learners.base import Rows
from learners.encoding import EncodedBatch, FeatureEncoder, inference
from learners.links import CORRECTED_LOSSES, calibrated_logits, fnc_correct
from learners.losses import LOSSES, bce_with_logits
from learners.mixture import FallbackMixture
from learners.models import (
    INITIAL_CTR,
    PLE,
    DCNv2,
    DeepFM,
    DelayHead,
    LogisticModel,
    MMoE,
    WideAndDeep,
)
from learners.ranker_config import MODELS, MULTITASK_MODELS, RankerConfig
from learners.training import (
    Checkpointed,
    build_module,
    guarded_step,
    pick_device,
    read_checkpoint,
    weights_to_load,
)
from learners.util import logit, sigmoid

__all__ = ["MODELS", "RankerConfig", "TorchRanker"]

log = logging.getLogger(__name__)

_Inputs = tuple[Tensor, Tensor, Tensor | None, Tensor | None]
"""``(cat, num, seq, seq_age)`` model inputs on the device."""

# loss name -> {keyword of LOSSES[name]: RankerConfig field}
_LOSS_PARAMS: dict[str, dict[str, str]] = {
    "weighted_bce": {"pos_weight": "pos_weight"},
    "focal": {"gamma": "focal_gamma", "alpha": "focal_alpha"},
    "combined_pair": {"alpha": "pair_alpha"},
}


def _esmm_nll(click_logit: Tensor, cvr_logit: Tensor, y: Tensor, weights: Tensor | None) -> Tensor:
    """ESMM's CTCVR loss, summed: BCE of ``p = sigmoid(click) * sigmoid(cvr)`` against
    ``y`` (B,) (clicked and converted), computed in log space (``log p`` = the two
    log-sigmoids; ``log(1 - p)`` through ``log1p(-exp(log p))``, kept finite)."""
    log_p = nn.functional.logsigmoid(click_logit) + nn.functional.logsigmoid(cvr_logit)
    log_q = torch.log1p(-torch.exp(log_p).clamp(max=1.0 - 1e-7))
    nll = -(y * log_p + (1.0 - y) * log_q)
    return (nll if weights is None else nll * weights).sum()


class TorchRanker(Checkpointed):
    """Online CTR ranker (test-then-train) over flat example dicts.

    Example:
        >>> from learners.encoding import EncoderConfig
        >>> cfg = RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=1024),
        ...                    device="cpu")
        >>> ranker = TorchRanker(cfg, seed=0)
        >>> rows = [{"user_id": "u1", "item_id": "i1"}, {"user_id": "u2", "item_id": "i2"}]
        >>> p = ranker.score_and_learn(rows, np.array([1, 0]))
        >>> p.shape, bool(((p >= 0) & (p <= 1)).all()), ranker.n_updates
        ((2,), True, 1)
    """

    def __init__(
        self,
        config: RankerConfig = RankerConfig(),  # noqa: B008 - frozen, immutable default
        seed: int = 0,
        online: bool = True,
    ) -> None:
        self.config = config
        self.seed = seed
        self.online = online
        self.device = pick_device(config.device)
        self._cuda = self.device.type == "cuda"
        self.encoder = FeatureEncoder(config.encoder)
        self._generator = torch.Generator().manual_seed(seed)
        self.model = build_module(self._build_model, self.device)
        enc = config.encoder
        #: the DFM click-delay head (``config.has_delay_head``), else None; built with its
        #: own initial values even when loading (a checkpoint may lack it: DFM starts it)
        self.delay_head: DelayHead | None = (
            DelayHead(enc.num_buckets, enc.max_num_fields).to(self.device)
            if config.has_delay_head
            else None
        )
        params = {kw: getattr(config, f) for kw, f in _LOSS_PARAMS.get(config.loss, {}).items()}
        self._loss_fn = functools.partial(LOSSES[config.loss], **params)
        self._link_params: dict[str, float | None] = params
        self._corrected = config.loss_correction and config.loss in CORRECTED_LOSSES
        if self._corrected or config.prior_ctr != INITIAL_CTR:
            # The raw output whose corrected P(click) is prior_ctr.
            with torch.no_grad():
                self._output_bias().fill_(self._raw_logit(float(logit(config.prior_ctr)[0])))
        self.bias_centred = False
        self.task1_centred = False  # MMoE: task 1's bias, once centred on its labels (y2)
        self.task1_warm = (0.0, 0.0)  # (clicks, conversions) of its warm-up's known rows
        self.task1_rows = 0.0  # rows with a known y2 learnt while task 1 warms up
        #: with a task 1: its P(y2) of the last :meth:`score_and_learn` batch, (B,) float64
        self.last_task1: np.ndarray | None = None
        # (sum w y, sum w) of the examples learned while the bias warms up (bias_warmup)
        self.bias_warm = (0.0, 0.0)
        #: the online model selection served over the model (``config.uses_fallback``)
        self.mixture: FallbackMixture | None = (
            FallbackMixture(
                prior=config.prior_ctr,
                strength=config.bias_prior_strength or 1.0,
                cap=config.fallback_cap,
                fake_negatives=config.loss == "fnw" or config.fnc,
                half_life_clicks=config.fallback_half_life_clicks,
            )
            if config.uses_fallback
            else None
        )
        # Embedding tables get sparse gradients and lazy Adam (only the rows a batch uses
        # are read and written); a dense Adam step touches all 2**18 rows of every table,
        # which made the step memory-bound (bench.trainer). The rest: fused dense Adam.
        tables: list[Tensor] = []
        if config.sparse_embeddings:
            for module in self._modules_trained():
                if isinstance(module, nn.Embedding):
                    module.sparse = True
                    tables.append(module.weight)
        table_ids = {id(t) for t in tables}
        trained = list(self.model.parameters())
        if self.delay_head is not None:
            trained += list(self.delay_head.parameters())
        self._dense_params = [p for p in trained if id(p) not in table_ids]
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(self._dense_params, lr=self.lr, fused=fused)
        self.sparse_optimizer = torch.optim.SparseAdam(tables, lr=self.lr) if tables else None
        self.n_updates = 0
        self.n_skipped_nonfinite = 0
        self.last_loss: float | None = None

    def _modules_trained(self) -> Iterator[nn.Module]:
        """The model's modules, then the delay head's (when there is one)."""
        yield from self.model.modules()
        if self.delay_head is not None:
            yield from self.delay_head.modules()

    def _build_model(self) -> nn.Module:
        cfg, enc = self.config, self.config.encoder
        shape = (enc.num_buckets, enc.max_cat_fields, enc.max_num_fields)
        dim, gen = cfg.embedding_dim, self._generator
        pairs = cfg.pair_crosses
        if cfg.model == "logreg":
            return LogisticModel(*shape, embedding_dim=dim, generator=gen, pair_crosses=pairs)
        behaviour = {
            "sequence": self.uses_sequence,
            "pair_crosses": pairs,
            "attention_log_mass": cfg.attention_log_mass,
        }
        if cfg.model == "wide_deep":
            return WideAndDeep(
                *shape, embedding_dim=dim, hidden=cfg.hidden, generator=gen, **behaviour
            )
        if cfg.model == "deepfm":
            return DeepFM(*shape, embedding_dim=dim, hidden=cfg.hidden, generator=gen, **behaviour)
        if cfg.model == "ple":  # MMoE's arguments, and each task's own experts
            return PLE(
                *shape, embedding_dim=dim, hidden=cfg.hidden, num_experts=cfg.num_experts,
                num_tasks=cfg.num_tasks, generator=gen, task_experts=cfg.task_experts,
                levels=cfg.ple_levels, cross_layers=cfg.cross_layers, **behaviour,
            )  # fmt: skip
        if cfg.model == "mmoe":
            return MMoE(
                *shape, embedding_dim=dim, hidden=cfg.hidden, num_experts=cfg.num_experts,
                num_tasks=cfg.num_tasks, generator=gen, cross_layers=cfg.cross_layers,
                **behaviour,
            )  # fmt: skip
        return DCNv2(
            *shape,
            embedding_dim=dim,
            cross_layers=cfg.cross_layers,
            hidden=cfg.hidden,
            generator=gen,
            **behaviour,
        )

    @property
    def uses_sequence(self) -> bool:
        """Whether the model attends over ``hist_seq`` (config on, encoder has the block,
        and the model is not ``logreg``)."""
        cfg = self.config
        return cfg.sequence_attention and cfg.encoder.max_seq_len > 0 and cfg.model != "logreg"

    @property
    def lr(self) -> float:
        """Adam learning rate: ``base_lr * online_lr_scale`` when online, else ``base_lr``."""
        scale = self.config.online_lr_scale if self.online else 1.0
        return self.config.base_lr * scale

    # -- internals -------------------------------------------------------------------------
    def _to_device(self, a: np.ndarray) -> Tensor:
        """Host array -> tensor on the device; through pinned memory, asynchronously, on CUDA."""
        t = torch.from_numpy(a)
        if self._cuda:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        """bf16 autocast when ``config.amp`` and the device is CUDA; otherwise nothing."""
        if self.config.amp and self._cuda:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    def _output_bias(self) -> Tensor:
        bias = self.model.output_bias
        assert isinstance(bias, Tensor)
        return bias

    def _tensors(self, X: Rows) -> _Inputs:
        """``(cat, num, seq, seq_age)`` on the device; ``seq``/``seq_age`` None unless the
        model attends and some row of the batch has history (an all-padding block pools to
        zero anyway, so its attention pass is skipped)."""
        return self._inputs(self.encoder.encode(X))

    def _inputs(self, batch: EncodedBatch) -> _Inputs:
        """An encoded batch on the device, as :meth:`_tensors` gives it."""
        cat, num = self._to_device(batch.cat), self._to_device(batch.num)
        if not self.uses_sequence or batch.seq is None or not batch.seq.any():
            return cat, num, None, None
        assert batch.seq_age is not None
        return cat, num, self._to_device(batch.seq), self._to_device(batch.seq_age)

    def _calibrated(self, raw_logits: np.ndarray) -> np.ndarray:
        """Raw model logits (B,) -> logits of P(click) (B,), float64."""
        if not self._corrected:
            return raw_logits
        return calibrated_logits(raw_logits, self.config.loss, **self._link_params)

    def _served(self, raw_logits: np.ndarray) -> np.ndarray:
        """Raw model logits (B,) -> P(click) (B,), float64: the loss's correction, sigmoid,
        then the FNC link when ``config.fnc``."""
        p = sigmoid(self._calibrated(raw_logits))
        return fnc_correct(p) if self.config.fnc else p

    def _raw_logit(self, target: float) -> float:
        """The raw logit whose calibrated logit is ``target`` (bisection; the map is monotone)."""
        if not self._corrected:
            return target
        lo, hi = -40.0, 40.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if float(self._calibrated(np.array([mid]))[0]) < target:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def _centre_output_bias(self, raw_logits: np.ndarray, y: np.ndarray, w: np.ndarray) -> bool:
        """Shift the output bias so the weighted mean P(click) of the batch is the shrunk CTR
        of every example learned while warming up (this batch included).

        ``raw_logits``, ``y``, ``w``: float64 (B,). Returns False (nothing done) when the
        labels or weights are not usable (non-finite, or no positive weight).
        """
        strength = self.config.bias_prior_strength
        if strength is None or not (np.all(np.isfinite(y)) and np.all(np.isfinite(w))):
            return False
        total = float(w.sum())
        if total <= 0:
            return False
        prior = self.config.prior_ctr
        seen_wy, seen_w = self.bias_warm
        seen_wy, seen_w = seen_wy + float((w * y).sum()), seen_w + total
        self.bias_warm = (seen_wy, seen_w)
        if self.config.loss == "fnw":
            # a fake-negative stream: every impression is a negative and each click adds a
            # positive, so the CTR is positives / (examples - positives), not their share
            target = (seen_wy + strength * prior) / (seen_w - seen_wy + strength)
        else:
            target = (seen_wy + strength * prior) / (seen_w + strength)
        lo, hi = -40.0, 40.0  # logit shift; the weighted mean prediction increases with it
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            mean_p = float((w * sigmoid(self._calibrated(raw_logits + mid))).sum()) / total
            if mean_p < target:
                lo = mid
            else:
                hi = mid
        with torch.no_grad():
            self._output_bias().add_(0.5 * (lo + hi))
        return True

    def _centre_task1_bias(self, task_logits: np.ndarray, y: np.ndarray, y2: np.ndarray) -> bool:
        """MMoE: shift task 1's output bias (a fresh tower starts at ``logit(prior_ctr)``,
        which plain steps take hundreds of batches to leave). The clicks and conversions of
        the rows with a known ``y2`` are summed over batches (``task1_warm``, rows in
        ``task1_rows``).

        ``task1="direct"``: the batch's mean P(y2) is set to the y2 rate of every known row
        so far (this batch's included) shrunk to ``prior_ctr`` with ``bias_prior_strength``
        pseudo-examples, on the first batch with labels. Offline (``online=False``: a log
        whose rows carry their final labels) it warms up as task 0 does, again on every
        learning step until ``bias_warmup`` known rows have been learnt: its single-task
        model (the same label as task 0) has that warm-up, and without it the multi-task
        one lost more NE on task 1 than sharing the experts gained (``bench.multitask``).
        Online it is centred once: a stream's second labels arrive after the rest of
        their impressions' rows (by the conversion delay; with final labels by the
        conversion window too), so the running y2 rate is low at first, and a warm-up on it
        held task 1 there. Through the worker at 30,000 impressions a minute with 120 s
        windows and final labels, task-1 NE 0.996 and 0.998 with the warm-up against 0.979
        without; a target the lag does not bias (click rate x conversions / clicked
        outcomes) did no better (1.008, one run). With fresh labels the warm-up gave 0.971
        against 0.974 at 1,000 a minute and 0.957 both at 30,000 (one run each): one rule
        for every stream, the one that never measured worse.

        ``"esmm"``: task 1 is P(conversion | click), so it needs clicks; it is shifted
        once, when the rows hold ``bias_prior_strength`` clicks: the batch's mean pCVR is
        set to conversions / clicks (within [1e-4, 0.9]). That needs clicked rows whose
        ``y2`` is their final outcome, converted or not, in proportion (offline logs;
        ``join.delayed_feedback="window"`` sends them so). A stream whose only clicked
        rows with ``y2`` are conversions (fresh labels: the non-conversions' 0 rode on
        their label-0 records) is shifted on its CTCVR rate instead: the y2 rate shrunk as
        for ``"direct"``, matched by the batch's mean pCTR x pCVR. A warm-up like
        ``"direct"``'s, on the CTCVR rate, measured worse for both tasks (seed 0 of
        ``bench.multitask --n 300000``: task-1 NE 0.9748 against 0.9725 shifted once).

        ``task_logits``: float64 (B, T); ``y``, ``y2``: (B,), ``y2`` NaN where unknown.
        False (nothing done) without enough labels, or with ``bias_prior_strength``
        None."""
        strength = self.config.bias_prior_strength
        known = np.isfinite(y2)
        if strength is None or not known.any():
            return False
        clicks, conversions = self.task1_warm
        clicks += float(y[known].sum())
        conversions += float(y2[known].sum())
        self.task1_warm = (clicks, conversions)
        self.task1_rows += float(known.sum())
        shrunk = (conversions + strength * self.config.prior_ctr) / (self.task1_rows + strength)
        if self.config.task1 == "direct":
            return self._shift_task1(task_logits[known], shrunk, esmm=False)
        if clicks < strength:
            return False
        if conversions >= clicks:  # only conversions among the clicked rows: fresh
            return self._shift_task1(task_logits[known], shrunk, esmm=True)
        target = min(max(conversions / clicks, 1e-4), 0.9)
        return self._shift_task1(task_logits[known], target, esmm=False)

    def _shift_task1(self, task_logits: np.ndarray, target: float, esmm: bool) -> bool:
        """Add to task 1's output bias the shift that makes the mean over ``task_logits``
        (R, T) float64 of sigmoid(task 1), or with ``esmm`` of sigmoid(task 0) x
        sigmoid(task 1) (within 0.9 x the mean pCTR), equal ``target``. True."""
        l1 = task_logits[:, 1]
        scale = sigmoid(task_logits[:, 0]) if esmm else np.ones_like(l1)
        target = min(target, 0.9 * float(scale.mean()))
        lo, hi = -40.0, 40.0  # the mean probability increases with the shift
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if float(np.mean(scale * sigmoid(l1 + mid))) < target:
                lo = mid
            else:
                hi = mid
        assert isinstance(self.model, MMoE)
        with torch.no_grad():
            self.model.task_bias(1).add_(0.5 * (lo + hi))
        return True

    def _targets(self, X: Rows, y: Any, w: Any) -> tuple[Tensor, Tensor | None]:
        y_arr = np.asarray(y, dtype=np.float32).reshape(-1)
        if y_arr.shape[0] != len(X):
            raise ValueError(f"len(y)={y_arr.shape[0]} does not match len(X)={len(X)}")
        t = self._to_device(y_arr)
        if w is None:
            return t, None
        w_arr = np.asarray(w, dtype=np.float32).reshape(-1)
        if w_arr.shape[0] != len(X):
            raise ValueError(f"len(w)={w_arr.shape[0]} does not match len(X)={len(X)}")
        return t, self._to_device(w_arr)

    @property
    def has_task1(self) -> bool:
        """The model has a second task (MMoE with ``num_tasks >= 2``) that ``y2`` trains."""
        return isinstance(self.model, MMoE) and self.model.num_tasks >= 2

    def _second_targets(self, X: Rows, y2: Any, w2: Any) -> tuple[Tensor | None, Tensor | None]:
        """``y2`` (and ``w2``, None: ``w``'s) as (B,) tensors when the model has a task 1
        to train, else (None, None)."""
        if y2 is None or not self.has_task1:
            return None, None
        y2_arr = np.asarray(y2, dtype=np.float32).reshape(-1)
        if y2_arr.shape[0] != len(X):
            raise ValueError(f"len(y2)={y2_arr.shape[0]} does not match len(X)={len(X)}")
        if w2 is None:
            return self._to_device(y2_arr), None
        w2_arr = np.asarray(w2, dtype=np.float32).reshape(-1)
        if w2_arr.shape[0] != len(X):
            raise ValueError(f"len(w2)={w2_arr.shape[0]} does not match len(X)={len(X)}")
        if not np.all(np.isfinite(w2_arr) & (w2_arr >= 0)):
            raise ValueError("task-1 weights w2 must be finite and >= 0")
        return self._to_device(y2_arr), self._to_device(w2_arr)

    def _forward(self, inputs: _Inputs) -> tuple[Tensor, Tensor | None]:
        """Click logits (B,) and, for MMoE, all task logits (B, T); float32 (also under amp)."""
        cat, num, seq, seq_age = inputs
        with self._autocast():
            if isinstance(self.model, MMoE):
                tasks = self.model.forward_tasks(cat, num, seq, seq_age).float()
                return tasks[:, 0], tasks
            return self.model(cat, num, seq, seq_age).float(), None

    def _log_rate(self, inputs: _Inputs) -> Tensor:
        """The delay head's log-rates (B,) per ``delay_scale_s``, float32."""
        assert self.delay_head is not None
        cat, num, _, _ = inputs
        return self.delay_head(cat, num).float()

    def _elapsed(self, X: Rows, elapsed: Any) -> Tensor | None:
        """``elapsed`` seconds (B,) -> a tensor in units of ``delay_scale_s`` for the DFM
        loss; None when not given or the loss is not ``dfm`` (it ignores them then)."""
        if elapsed is None or self.config.loss != "dfm":
            return None
        e = np.asarray(elapsed, dtype=np.float32).reshape(-1)
        if e.shape[0] != len(X):
            raise ValueError(f"len(elapsed)={e.shape[0]} does not match len(X)={len(X)}")
        if np.any(e < 0):
            raise ValueError("elapsed times must be >= 0 seconds")
        return self._to_device(e / np.float32(self.config.delay_scale_s))

    def _loss(
        self,
        logits: Tensor,
        targets: Tensor,
        weights: Tensor | None,
        task_logits: Tensor | None = None,
        targets2: Tensor | None = None,
        log_rate: Tensor | None = None,
        elapsed: Tensor | None = None,
        weights2: Tensor | None = None,
    ) -> Tensor:
        """Configured loss on the click; plus, for MMoE with ``y2``, BCE of task 1 on the rows
        where ``y2`` is finite (mean over those rows; 0 when there are none), weighted by
        ``weights2`` (None: the click's ``weights``). ``log_rate`` and ``elapsed`` (B,): the
        DFM loss's delay terms (``loss="dfm"`` only)."""
        if elapsed is not None:
            loss = self._loss_fn(logits, targets, weights=weights, log_rate=log_rate,
                                 elapsed=elapsed)  # fmt: skip
        else:
            loss = self._loss_fn(logits, targets, weights=weights)
        if task_logits is None or targets2 is None:
            return loss
        known = torch.isfinite(targets2)
        both = weights if weights2 is None else weights2
        w2 = None if both is None else both[known]
        if self.config.task1 == "esmm":
            task1 = _esmm_nll(task_logits[known, 0], task_logits[known, 1], targets2[known], w2)
        else:
            task1 = bce_with_logits(task_logits[known, 1], targets2[known], weights=w2,
                                    reduction="sum")  # fmt: skip
        # The sum over zero known rows is 0, not the NaN of an empty mean.
        return loss + task1 / known.sum().clamp(min=1)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The dense Adam and, with ``sparse_embeddings``, the tables' SparseAdam."""
        return [self.optimizer] + ([] if self.sparse_optimizer is None else [self.sparse_optimizer])

    def _step(self, loss: Tensor) -> None:
        """One Adam step (dense parameters clipped to ``grad_clip_norm``; embedding rows by
        lazy SparseAdam, which bounds each row's step by the learning rate); a non-finite
        loss or gradient skips it (weights unchanged)."""
        if not guarded_step(loss, self._dense_params, self.config.grad_clip_norm,
                            self.optimizers):  # fmt: skip
            self.n_skipped_nonfinite += 1
            return
        self.n_updates += 1
        self.last_loss = float(loss.detach())

    # -- public interface ------------------------------------------------------------------
    @inference  # serving cannot change the model: no new slots
    def predict_logit_many(self, X: Rows) -> np.ndarray:
        """The model's raw logits (the loss's input), float64 ``(B,)``. Eval mode, no gradient.

        For ``focal`` / ``weighted_bce`` with ``loss_correction``, or with ``fnc``, ``sigmoid``
        of these is not P(click); :meth:`predict_proba_many` applies the correction.
        """
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        return self._predict_logits(self._tensors(X))

    def _predict_logits(self, inputs: _Inputs) -> np.ndarray:
        if self.model.training:  # only the training step switches it back
            self.model.eval()
        with torch.inference_mode():
            logits, _ = self._forward(inputs)
        return logits.cpu().numpy().astype(np.float64)

    def predict_proba_many(self, X: Rows) -> np.ndarray:
        """P(click), float64 ``(B,)`` in [0, 1] (with the fallback mixture when on)."""
        p = self._served(self.predict_logit_many(X))
        return p if self.mixture is None else self.mixture.serve(p)

    @inference
    def predict_tasks_many(self, X: Rows) -> dict[str, np.ndarray]:
        """MMoE's task probabilities, float64 ``(B,)`` each, from the model's own logits
        (no loss correction, FNC link or fallback mixture: those are the click's
        serving path, :meth:`predict_proba_many`): ``ctr`` = sigmoid(task 0) and
        ``task1`` = P(y2) as trained (``task1="direct"``: sigmoid(task 1); ``"esmm"``:
        pCTCVR = pCTR * pCVR), and with ``"esmm"`` also ``cvr`` = P(conversion | click).
        Raises ValueError for a model without a task 1."""
        if not isinstance(self.model, MMoE) or self.model.num_tasks < 2:
            raise ValueError("predict_tasks_many needs model='mmoe' with num_tasks >= 2")
        if len(X) == 0:
            empty = np.zeros(0, dtype=np.float64)
            keys = ("ctr", "task1", "cvr") if self.config.task1 == "esmm" else ("ctr", "task1")
            return dict.fromkeys(keys, empty)
        inputs = self._tensors(X)
        self.model.eval()
        with torch.inference_mode():
            _, tasks = self._forward(inputs)
        assert tasks is not None
        p = torch.sigmoid(tasks[:, :2].double()).cpu().numpy()
        out = {"ctr": p[:, 0], "task1": self._task1_probability(tasks)}
        if self.config.task1 == "esmm":
            out["cvr"] = p[:, 1]
        return out

    @inference
    def predict_delay_rate_many(self, X: Rows) -> np.ndarray:
        """The delay head's click-delay rates, per SECOND, float64 ``(B,)`` (the mean delay
        of a click is ``1 / rate``). Raises ValueError without a delay head."""
        if self.delay_head is None:
            raise ValueError("this ranker has no delay head (loss='dfm' or delay_head=True)")
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        inputs = self._tensors(X)
        self.delay_head.eval()
        with torch.no_grad():
            g = self._log_rate(inputs)
        g64 = g.detach().cpu().numpy().astype(np.float64)
        return np.exp(g64) / self.config.delay_scale_s

    def start_delay_at(self, mean_delay_s: float) -> None:
        """Set the delay head's bias so that its rate is ``1 / mean_delay_s`` where the
        bucket weights are 0 (a fresh head: everywhere); e.g. the mean click delay of a
        log before pretraining (the exact rate of Exponential delays observed in full)."""
        if self.delay_head is None:
            raise ValueError("this ranker has no delay head (loss='dfm' or delay_head=True)")
        if not (math.isfinite(mean_delay_s) and mean_delay_s > 0):
            raise ValueError(f"mean_delay_s must be positive finite, got {mean_delay_s}")
        with torch.no_grad():
            self.delay_head.bias.fill_(math.log(self.config.delay_scale_s / mean_delay_s))

    def learn_many(
        self, X: Rows, y: Any, w: Any = None, y2: Any = None, elapsed: Any = None,
        w2: Any = None,
    ) -> None:  # fmt: skip
        """One optimiser step on the batch (``y``: (B,) 0/1, ``w``: optional (B,) weights).

        ``y2``: optional (B,) task-1 labels, NaN where unknown; used by ``model="mmoe"``/``"ple"``
        only (ignored by single-task models). ``w2``: optional (B,) task-1 weights >= 0
        (None: ``w``); e.g. a record that teaches task 1 only has ``w`` 0 and ``w2`` 1.
        ``elapsed``: optional (B,) seconds >= 0 for ``loss="dfm"``: a label-1 row's click
        delay, a label-0 row's time observed without a click (ignored by other losses;
        None: the labels are final).
        """
        self._learn(X, y, w, y2, elapsed, scores=False, w2=w2)

    def score_and_learn(
        self, X: Rows, y: Any, w: Any = None, y2: Any = None, elapsed: Any = None,
        w2: Any = None,
    ) -> np.ndarray:  # fmt: skip
        """Progressive validation: P(click) float64 ``(B,)`` BEFORE the update, then learn.

        The models have no dropout/batch norm, so the training forward pass yields the
        same scores as :meth:`predict_proba_many` and is reused. ``y2``, ``w2`` and
        ``elapsed`` as in :meth:`learn_many`. With a task 1, :attr:`last_task1` holds its
        probabilities (:meth:`predict_tasks_many`'s ``task1``) of the same rows, also
        before the update.
        """
        out = self._learn(X, y, w, y2, elapsed, scores=True, w2=w2)
        assert out is not None
        return out

    def _learn(
        self, X: Rows, y: Any, w: Any, y2: Any, elapsed: Any, scores: bool, w2: Any = None
    ) -> np.ndarray | None:
        if len(X) == 0:
            if scores and self.has_task1:
                self.last_task1 = np.zeros(0, dtype=np.float64)
            return np.zeros(0, dtype=np.float64) if scores else None
        targets, weights = self._targets(X, y, w)
        targets2, weights2 = self._second_targets(X, y2, w2)
        elapsed_t = self._elapsed(X, elapsed)
        inputs = self._tensors(X)
        self.model.train()
        logits, task_logits = self._forward(inputs)
        centre = self.config.bias_prior_strength is not None and (
            not self.bias_centred or self.bias_warm[1] < self.config.bias_warmup
        )
        mixture = self.mixture
        needed = scores or centre or mixture is not None
        raw = logits.detach().cpu().numpy().astype(np.float64) if needed else None
        if scores and task_logits is not None and self.has_task1:
            self.last_task1 = self._task1_probability(task_logits.detach())
        p_model = self._served(raw) if raw is not None and (scores or mixture is not None) else None
        p = p_model
        if raw is not None and (centre or mixture is not None):
            y_arr = np.asarray(y, dtype=np.float64).reshape(-1)
            w_arr = np.ones_like(y_arr) if w is None else np.asarray(w, np.float64).reshape(-1)
        if mixture is not None and p_model is not None:
            # judged on the batch before anyone learns from it (prequential)
            p = mixture.serve(p_model) if scores else None
            mixture.update(p_model, y_arr, w_arr)
        if centre and raw is not None:
            if self._centre_output_bias(raw, y_arr, w_arr):
                self.bias_centred = True
                # The first gradient is taken at the re-centred bias: at a badly wrong CTR it
                # would push every parameter the same way and Adam's momentum would carry it.
                logits, task_logits = self._forward(inputs)
        warming1 = not self.task1_centred or (
            self.config.task1 == "direct"
            and not self.online
            and self.task1_rows < self.config.bias_warmup
        )
        if targets2 is not None and task_logits is not None and warming1:
            tl = task_logits.detach().cpu().numpy().astype(np.float64)
            y_now = np.asarray(y, dtype=np.float64).reshape(-1)
            y2_now = np.asarray(y2, dtype=np.float64).reshape(-1)
            if self._centre_task1_bias(tl, y_now, y2_now):
                self.task1_centred = True
                logits, task_logits = self._forward(inputs)
        log_rate = None
        if elapsed_t is not None:
            assert self.delay_head is not None  # loss "dfm" always has one
            self.delay_head.train()
            log_rate = self._log_rate(inputs)
        self._step(self._loss(logits, targets, weights, task_logits, targets2, log_rate, elapsed_t,
                              weights2))  # fmt: skip
        return p

    def _task1_probability(self, task_logits: Tensor) -> np.ndarray:
        """P(y2) float64 (B,) from MMoE's task logits (B, T): sigmoid(task 1), or with
        ESMM sigmoid(task 0) * sigmoid(task 1)."""
        p = torch.sigmoid(task_logits[:, :2].double()).cpu().numpy()
        return p[:, 0] * p[:, 1] if self.config.task1 == "esmm" else p[:, 1]

    def _vectors(self, field_name: str, values: Sequence[str]) -> np.ndarray:
        ids = torch.from_numpy(self.encoder.bucket_ids(field_name, values)).to(self.device)
        embedding: nn.Embedding = self.model.embedding  # type: ignore[assignment]
        with torch.no_grad():
            vecs = embedding.weight[ids]
        return vecs.cpu().numpy().astype(np.float32)

    def item_vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """Item embeddings, float32 ``(N, embedding_dim)``, not normalised."""
        return self._vectors("item_id", item_ids)

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        """User embeddings, float32 ``(N, embedding_dim)``, not normalised."""
        return self._vectors("user_id", user_ids)

    def clone(self) -> TorchRanker:
        """An untrained copy with the same config, seed and online flag."""
        return TorchRanker(self.config, seed=self.seed, online=self.online)

    # -- persistence -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything :meth:`save` writes; plain containers and tensors only."""
        return {
            "config": self.config.to_dict(),
            "seed": self.seed,
            "online": self.online,
            "model": self.model.state_dict(),
            "delay_head": None if self.delay_head is None else self.delay_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sparse_optimizer": (
                None if self.sparse_optimizer is None else self.sparse_optimizer.state_dict()
            ),
            "encoder": self.encoder.state_dict(),
            "n_updates": self.n_updates,
            "n_skipped_nonfinite": self.n_skipped_nonfinite,
            "bias_centred": self.bias_centred,
            "task1_centred": self.task1_centred,
            "task1_warm": list(self.task1_warm),
            "task1_warm_rows": self.task1_rows,
            "bias_warm": list(self.bias_warm),
            "mixture": None if self.mixture is None else self.mixture.state(),
        }

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | None = None,
        online: bool | None = None,
        loss: str | None = None,
        fnc: bool | None = None,
    ) -> TorchRanker:
        """Load a checkpoint written by :meth:`save`, optionally onto another ``device``.

        ``online``: override the saved mode; e.g. ``online=True`` warm-starts an offline
        (pretrain) checkpoint at ``base_lr * online_lr_scale``. ``loss``: continue with
        another loss than the saved one, e.g. ``"fnw"`` online on fake negatives after a
        pretrain on final labels with ``"bce"``; ``fnc``: likewise the FNC output link.
        """
        return cls.from_state(read_checkpoint(path), device=device, online=online,
                              source=str(path), loss=loss, fnc=fnc)  # fmt: skip

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        device: str | None = None,
        online: bool | None = None,
        source: str = "state",
        loss: str | None = None,
        fnc: bool | None = None,
    ) -> TorchRanker:
        """A ranker from :meth:`state` (see :meth:`load`). Without the ``optimizer`` key
        (a serving snapshot, :mod:`modelstore.snapshot`) the optimiser moments start
        afresh."""
        given: dict[str, Any] = {"device": device, "loss": loss, "fnc": fnc}
        saved_head = state.get("delay_head")
        if saved_head is not None:  # a trained delay head stays, whatever loss follows
            given["delay_head"] = True
        config = dataclasses.replace(
            RankerConfig.from_dict(state["config"]),
            **{k: v for k, v in given.items() if v is not None},
        )
        if (
            config.model in MULTITASK_MODELS
            and config.cross_layers
            and not any(k.startswith("cross_heads.") for k in state["model"])
        ):  # written before the multi-task models had cross layers (2026-12-07)
            config = dataclasses.replace(config, cross_layers=0)
        if online is None:
            online = bool(state.get("online", True))
        with weights_to_load():  # every weight is loaded below: no random init
            ranker = cls(config, seed=int(state["seed"]), online=online)
        try:
            ranker.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(
                f"{source}: the checkpoint's model weights do not match its config "
                f"(model={config.model!r}, sequence_attention={config.sequence_attention}, "
                f"pair_crosses={config.pair_crosses}): {e}"
            ) from e
        fresh_head = ranker.delay_head is not None and saved_head is None
        if ranker.delay_head is not None and saved_head is not None:
            ranker.delay_head.load_state_dict(saved_head)
        elif fresh_head:  # e.g. loss="dfm" over a checkpoint trained without the head
            log.info("%s: no delay head in the checkpoint; it starts afresh", source)
        sparse_state: Any = state.get("sparse_optimizer")
        if "optimizer" not in state:
            pass  # weights only: the moments start afresh
        elif fresh_head:  # the optimiser's parameter list has the new head's too
            log.warning("%s: optimizer state without the delay head, not loaded", source)
        elif (sparse_state is None) == (ranker.sparse_optimizer is None):
            ranker.optimizer.load_state_dict(state["optimizer"])
            if ranker.sparse_optimizer is not None:
                ranker.sparse_optimizer.load_state_dict(sparse_state)
        else:  # written with the other optimizer layout: the moments start afresh
            log.warning("%s: optimizer state from another layout, not loaded", source)
        for opt in ranker.optimizers:  # the saved lr may be the offline one
            for group in opt.param_groups:
                group["lr"] = ranker.lr
        ranker.encoder.load_state_dict(state["encoder"])
        ranker.n_updates = int(state["n_updates"])
        ranker.n_skipped_nonfinite = int(state.get("n_skipped_nonfinite", 0))
        # Checkpoints from before the flag: a trained model is never re-centred.
        ranker.bias_centred = bool(state.get("bias_centred", ranker.n_updates > 0))
        ranker.task1_centred = bool(state.get("task1_centred", ranker.n_updates > 0))
        clicks, conversions = state.get("task1_warm", (0.0, 0.0))
        ranker.task1_warm = (float(clicks), float(conversions))
        # Checkpoints from before task 1's warm-up (2026-12-07, "task1_rows"): centred
        # once, it has finished warming up.
        old_rows = math.inf if ranker.task1_centred else state.get("task1_rows", 0.0)
        ranker.task1_rows = float(state.get("task1_warm_rows", old_rows))
        # Checkpoints from before the warm-up: a trained model has finished warming up.
        done = (0.0, math.inf) if ranker.n_updates > 0 else (0.0, 0.0)
        warm = state.get("bias_warm")
        ranker.bias_warm = done if warm is None else (float(warm[0]), float(warm[1]))
        if ranker.mixture is not None:
            mix = state.get("mixture")
            if mix is not None:
                ranker.mixture.load_state(mix)
            elif ranker.n_updates > 0:  # written before the mixture (or with it off)
                ranker.mixture.settle_on_ranker()
        return ranker
