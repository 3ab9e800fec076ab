"""The settings of the online ranker (:class:`~learners.ranker.TorchRanker`):
:class:`RankerConfig`, a frozen dataclass checked on construction, and :data:`MODELS`, the
model families it can build. ``to_dict`` / ``from_dict`` give the plain-container form a
checkpoint stores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from learners.encoding import EncoderConfig
from learners.losses import LOSSES
from learners.models import INITIAL_CTR

__all__ = ["MODELS", "RankerConfig"]

MODELS = ("logreg", "wide_deep", "deepfm", "dcnv2", "mmoe", "ple")
#: the multi-task models (task 0 the click, task 1 the second label)
MULTITASK_MODELS = ("mmoe", "ple")
"""Values accepted by ``RankerConfig.model``."""

#: what MMoE's task 1 learns (RankerConfig.task1)
TASK1_MODES = ("direct", "esmm")

_PRE_BEHAVIOUR = ("sequence_attention", "pair_crosses", "attention_log_mass")


@dataclass(frozen=True)
class RankerConfig:
    """Ranker settings. ``lr`` used = ``base_lr * online_lr_scale`` when online.

    ``pos_weight`` is used by ``loss="weighted_bce"``, ``pair_alpha`` (the BCE share) by
    ``loss="combined_pair"``, ``focal_*`` by ``loss="focal"``; ``num_experts`` and
    ``num_tasks`` by ``model="mmoe"`` (task 0 = click, task 1 = the optional ``y2`` label).
    ``task1`` (MMoE): ``"direct"``: task 1's logit is P(y2), trained by BCE on the rows
    where ``y2`` is known; ``"esmm"`` (Ma et al. 2018, SIGIR): ``y2`` is "clicked and
    converted" on every impression, task 1's logit is P(conversion | click) and the loss
    is BCE of ``pCTR * pCVR`` against ``y2`` over all impressions, so the conversion
    model is learnt on the whole impression space, not only on clicks.

    ``prior_ctr`` in (0, 1): the CTR the output bias starts at. ``bias_prior_strength``
    (pseudo-examples, > 0, or None to disable): on a fresh ranker's first learning step the
    output bias is shifted so that the batch's mean prediction is
    ``(sum w y + s prior_ctr) / (sum w + s)``; ``bias_warmup`` (examples, >= 0): the same
    shift is made on every learning step until that many examples (by weight) have been
    learned, with the sums running over all of them, so a cold model follows the log's
    shrunk base rate instead of waiting for gradient steps to walk the bias there (a log
    whose CTR is far from ``prior_ctr``, e.g. 0.4% against 3%, otherwise over-predicts for
    thousands of impressions). ``loss_correction``: map the outputs of
    ``focal`` / ``weighted_bce`` models back to P(click) (:mod:`learners.links`); focal at
    default settings is otherwise badly over-predicting (calibration ratio ~4.6 at a 5% CTR).
    ``fnc``: serve ``p = b / (1 - b)`` (:func:`learners.links.fnc_correct`) of the model's
    probability ``b``, for plain BCE (``loss="bce"`` only) on the fake-negative stream,
    which learns ``b = p / (1 + p)``; an output link only, training is unchanged. The
    stream layer sets it from ``trainer.fnc``.
    ``delay_head``: a click-delay head (:class:`learners.models.DelayHead`, DFM, Chapelle
    2014) beside the model; always on with ``loss="dfm"``, which trains it
    (:func:`learners.losses.dfm_loss`). The served score is the click probability only.
    ``delay_scale_s`` (seconds, > 0): the head's time unit; delays and elapsed times are
    divided by it, so the rate stays near 1 for delays near it (the head starts at a mean
    delay of one unit). Saved with the ranker (``state()["delay_head"]``).
    ``amp``: bf16 autocast of the forward pass on CUDA; ignored on the CPU.
    ``sparse_embeddings``: sparse gradients and lazy Adam (SparseAdam) for the embedding
    tables, dense Adam for the rest; False: one dense Adam over everything.
    ``sequence_attention``: DIN-style target attention of the candidate over the row's
    ``hist_seq`` (:class:`learners.layers.TargetAttention`; needs ``encoder.max_seq_len > 0``;
    not used by ``logreg``). ``pair_crosses``: a hashed scalar weight per user x item pair
    (:class:`learners.layers.PairCrosses`). ``attention_log_mass``: the attention's
    mass summary enters the model as ``log1p`` (see :class:`learners.layers.TargetAttention`).
    ``fallback_mixture``: serve the online model selection of :mod:`learners.mixture`
    between the model and the running base rate of the labels (shrunk towards
    ``prior_ctr`` with ``bias_prior_strength`` pseudo-examples, or 1 when that is None),
    weighted by each one's prequential log loss; ``fallback_cap`` (nats, > 0): the clip of
    their log-loss difference (the mixture then keeps weight ~``e^-cap`` on the loser and
    can switch back after ``cap`` nats). ``fallback_half_life_clicks`` (> 0 or None): the
    base rate's labels count half after this many later clicks, so it follows a click
    rate that moves (200 since 2026-12-06; None: every label counts alike, as before).
    Not used with ``loss="dfm"`` (labels not final).
    On by default since 2026-12-06 (README "The fallback mixture": on a log with too few
    clicks to learn from it keeps the ranker from being worse than a constant model; it
    moves the calibration ratio by 0.5-1.5%, which the logit offset, ``[offset]``, off by
    default, takes out). A config dict written before it existed loads with it
    off; a checkpoint without mixture state loaded with it on starts served by the model
    (:meth:`learners.mixture.FallbackMixture.settle_on_ranker`).
    A config dict written before these settings existed loads with all three off and
    ``encoder.max_seq_len = 0`` (the layout and inputs its checkpoint was trained on).
    """

    model: str = "dcnv2"  # one of MODELS
    embedding_dim: int = 16
    cross_layers: int = 2
    hidden: tuple[int, ...] = (128, 64)
    loss: str = "bce"  # a key of learners.losses.LOSSES
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    pos_weight: float = 1.0
    pair_alpha: float = 0.5
    num_experts: int = 4
    num_tasks: int = 2
    task_experts: int = 2  # model="ple": each task's own experts per level
    ple_levels: int = 2  # model="ple": extraction levels (1: CGC)
    task1: str = "direct"  # one of TASK1_MODES: what MMoE's task 1 learns from y2
    # Cold/offline Adam rate. 0.005 beat 0.01 on both benchmark logs (prequential NE on 1M
    # synthetic impressions 0.958 vs 0.964; OBD 1.092 vs 1.101); the online rate
    # base_lr * online_lr_scale stays 0.001.
    base_lr: float = 0.005
    online_lr_scale: float = 0.2
    grad_clip_norm: float = 10.0
    device: str = "auto"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prior_ctr: float = INITIAL_CTR
    # 30 pseudo-examples (about one click at 3%). At 100 (until 2026-12-06) its 3
    # pseudo-clicks held a cold model above a 0.4% log for thousands of examples (cold
    # OBD worker: calibration ratio 1.21-1.39); 10 cost NE on logs with many clicks. README
    # "Cold start on a low-CTR log".
    bias_prior_strength: float | None = 30.0
    bias_warmup: float = 10_000.0
    loss_correction: bool = True
    fnc: bool = False
    delay_head: bool = False
    delay_scale_s: float = 300.0
    amp: bool = False
    sparse_embeddings: bool = True
    sequence_attention: bool = True
    pair_crosses: bool = True
    attention_log_mass: bool = True
    fallback_mixture: bool = True
    fallback_cap: float = 10.0
    fallback_half_life_clicks: float | None = 200.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {MODELS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {tuple(LOSSES)}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.cross_layers < 0:
            raise ValueError(f"cross_layers must be >= 0, got {self.cross_layers}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {self.hidden}")
        if self.fnc and self.loss != "bce":
            raise ValueError(
                f"fnc corrects plain BCE on fake negatives; loss {self.loss!r} with fnc would "
                "serve a miscalibrated score: use loss 'bce' or turn fnc off"
            )
        if not (math.isfinite(self.delay_scale_s) and self.delay_scale_s > 0):
            raise ValueError(f"delay_scale_s must be positive finite, got {self.delay_scale_s}")
        if self.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1] or None, got {self.focal_alpha}")
        if not (math.isfinite(self.pos_weight) and self.pos_weight > 0):
            raise ValueError(f"pos_weight must be a positive finite number, got {self.pos_weight}")
        if not 0.0 <= self.pair_alpha <= 1.0:
            raise ValueError(f"pair_alpha must be in [0, 1], got {self.pair_alpha}")
        if self.num_experts < 1 or self.num_tasks < 1:
            raise ValueError(
                f"num_experts and num_tasks must be >= 1, got {self.num_experts}, {self.num_tasks}"
            )
        if self.task1 not in TASK1_MODES:
            raise ValueError(f"task1 must be one of {TASK1_MODES}, got {self.task1!r}")
        if self.model in MULTITASK_MODELS and not self.hidden:
            raise ValueError(f"model={self.model!r} needs at least one hidden layer (the experts)")
        if self.task_experts < 1 or self.ple_levels < 1:
            raise ValueError(
                f"task_experts and ple_levels must be >= 1, got {self.task_experts}, "
                f"{self.ple_levels}"
            )
        for name in ("base_lr", "online_lr_scale", "grad_clip_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if not 0.0 < self.prior_ctr < 1.0:
            raise ValueError(f"prior_ctr must be in (0, 1), got {self.prior_ctr}")
        s = self.bias_prior_strength
        if s is not None and not (math.isfinite(s) and s > 0):
            raise ValueError(f"bias_prior_strength must be positive finite or None, got {s}")
        if not (math.isfinite(self.bias_warmup) and self.bias_warmup >= 0):
            raise ValueError(f"bias_warmup must be finite and >= 0, got {self.bias_warmup}")
        cap = self.fallback_cap
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"fallback_cap must be positive finite, got {cap}")
        hl = self.fallback_half_life_clicks
        if hl is not None and not (math.isfinite(hl) and hl > 0):
            raise ValueError(f"fallback_half_life_clicks must be positive finite or None, "
                             f"got {hl}")  # fmt: skip
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"invalid device {self.device!r}: {e}") from e
        # Accept a list for ``hidden`` (e.g. from TOML) but store the immutable form.
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    @property
    def uses_fallback(self) -> bool:
        """Whether the ranker serves the fallback mixture (on, and the labels are final)."""
        return self.fallback_mixture and self.loss != "dfm"

    @property
    def has_delay_head(self) -> bool:
        """Whether the ranker carries a click-delay head (``delay_head`` or ``loss="dfm"``)."""
        return self.delay_head or self.loss == "dfm"

    def to_dict(self) -> dict[str, Any]:
        """Plain containers only (lists, not tuples) so it loads with ``weights_only``."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["encoder"]["categorical_keys"] = list(self.encoder.categorical_keys)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RankerConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        enc = dict(d.pop("encoder", {}))
        # Written before the behaviour settings: the model had none of their parameters
        # (and, for attention_log_mass, read the attention mass unscaled).
        for key in _PRE_BEHAVIOUR:
            d.setdefault(key, False)
        enc.setdefault("max_seq_len", 0)
        if "categorical_keys" in enc:
            enc["categorical_keys"] = tuple(enc["categorical_keys"])
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(encoder=EncoderConfig(**enc), **d)
