"""The building blocks of the ranking models (:mod:`learners.models`): parameter
initialisers that take the caller's ``torch.Generator``, the ``Linear -> ReLU`` stack, and
the optional behaviour parts a model owns (:class:`Behaviour`): DIN-style target attention
of the candidate item over the user's recent clicks (:class:`TargetAttention`, with the
click ages in :func:`age_buckets`) and a hashed scalar weight per (user, item) pair
(:class:`PairCrosses`). Shapes: ``B`` rows, ``N`` sequence items, ``D`` embedding dims.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "EMB_STD",
    "N_AGE_BUCKETS",
    "Behaviour",
    "PairCrosses",
    "TargetAttention",
    "age_buckets",
    "init_embedding",
    "init_linear",
    "init_linears",
    "mlp",
]

EMB_STD = 0.05
"""Standard deviation of the initial embedding rows (the padding row is zero)."""


def init_embedding(emb: nn.Embedding, std: float, generator: torch.Generator | None) -> None:
    """Normal(0, ``std``) rows, the padding row (if any) zero."""
    with torch.no_grad():
        nn.init.normal_(emb.weight, 0.0, std, generator=generator)
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()


def init_linear(lin: nn.Linear, generator: torch.Generator | None) -> None:
    """Xavier-uniform weight, zero bias."""
    nn.init.xavier_uniform_(lin.weight, generator=generator)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


def mlp(width: int, hidden: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """``Linear -> ReLU`` per entry of ``hidden``; returns the stack and its output width."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width


def init_linears(module: nn.Module, generator: torch.Generator | None) -> None:
    """Xavier-initialise every ``nn.Linear`` inside ``module`` (in registration order)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init_linear(m, generator)


N_AGE_BUCKETS = 24
"""Age buckets of :func:`age_buckets`: 0 padding, 1 unknown, then log2 of minutes."""
_ATTENTION_HIDDEN = 32
# Hash multipliers of PairCrosses (odd, < 2**31 so that bucket * multiplier fits in int64).
_PAIR_A, _PAIR_B, _PAIR_C = 0x7FEB352D, 0x68E31DA5, 0x2C1B3C6D
# PairCrosses weights are stored divided by this: Adam moves a stored weight by about lr
# per step, so a pair seen a handful of times moves its logit by ~_PAIR_SCALE * lr per
# exposure (at the online lr 0.001 an unscaled pair weight would need ~100 exposures).
_PAIR_SCALE = 10.0


def age_buckets(seq: Tensor, seq_age: Tensor | None) -> Tensor:
    """Age bucket ids int64 ``(B, N)`` in ``[0, N_AGE_BUCKETS)``: 0 where ``seq`` is padding,
    1 where the age is unknown (< 0, or ``seq_age`` None), else
    ``2 + floor(log2(1 + age_s / 60))`` capped at the last bucket (~ 2 years)."""
    if seq_age is None:
        return torch.where(seq > 0, 1, 0)
    minutes = seq_age.float().clamp(min=0.0) / 60.0
    b = 2 + torch.floor(torch.log2(1.0 + minutes)).long().clamp(max=N_AGE_BUCKETS - 3)
    b = torch.where(seq_age < 0, 1, b)
    return torch.where(seq > 0, b, 0)


class TargetAttention(nn.Module):
    """DIN target attention (Zhou et al. 2018) of a candidate over a behaviour sequence.

    ``keys_j = e(seq_j) + a(age_bucket_j)``; weight ``w_j = sigmoid(u([q, k_j, q - k_j,
    q * k_j, m_j]))`` with ``u`` a ``Linear -> ReLU -> Linear`` activation unit and ``m_j``
    1 where ``seq_j`` is the candidate's own bucket; pooled ``sum_j mask_j w_j k_j`` (B, D).
    As in DIN the weights are not softmax-normalised, so the pooled vector keeps the
    intensity of the interest (how many related clicks); an empty sequence gives exactly
    the zero vector (no 0/0).

    Besides the pooled vector it returns ``SUMMARY`` scalars per row (B, 3): the attention
    mass ``sum_j mask_j w_j`` (``log1p`` of it with ``log_mass``, like every count the model
    reads: raw, it grows with the sequence length to ~N/2 at the start and swung the cold
    model's output; MovieLens NE over 3 seeds 0.952-0.980 raw, 0.952-0.961 log-scaled),
    ``log1p(#j: m_j)`` (clicks on this very item) and the recency
    of the latest such click, ``2 / (1 + age_bucket)`` in (0, 1] (0 without one). Telling
    "the candidate is one of my recent clicks" from embeddings alone takes a network many
    steps; the exact-match scalars give it at once, the attention the graded similarity.

    Example:
        >>> att = TargetAttention(4)
        >>> att.reset_parameters(torch.Generator().manual_seed(0))
        >>> q, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
        >>> seq = torch.tensor([[5, 6, 0], [0, 0, 0]])
        >>> ages = torch.tensor([[30.0, 4e3, 0.0], [0.0, 0.0, 0.0]])
        >>> pooled, summary = att(q, keys, seq, ages, torch.tensor([6, 6]))
        >>> pooled.shape, bool((pooled[1] == 0).all())
        (torch.Size([2, 4]), True)
        >>> [[round(float(v), 3) for v in row] for row in summary[:, 1:].detach()]  # log1p(1), 2/9
        [[0.693, 0.222], [0.0, 0.0]]
    """

    SUMMARY = 3

    def __init__(self, dim: int, hidden: int = _ATTENTION_HIDDEN, log_mass: bool = False) -> None:
        super().__init__()
        self.log_mass = log_mass
        self.age = nn.Embedding(N_AGE_BUCKETS, dim, padding_idx=0)
        self.unit = nn.Sequential(nn.Linear(4 * dim + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Small age embeddings (padding row zero), Xavier activation unit."""
        init_embedding(self.age, EMB_STD, generator)
        init_linears(self.unit, generator)

    def _scores(self, q: Tensor, k: Tensor, match: Tensor) -> Tensor:
        """``u([q, k, q - k, q * k, m])`` (B, N) without building the (B, N, 4D + 1) input:
        the first layer's weight split by block, ``W [q, k, q - k, q * k, m] =
        (W_q + W_d) q + [W_k - W_d, W_p] [k, q * k] + w_m m`` (the same function and
        parameters; the per-key product is half as wide, which was the step's largest cost)."""
        first, rest = self.unit[0], self.unit[1:]
        assert isinstance(first, nn.Linear)
        d = q.shape[-1]
        w = first.weight  # (H, 4D + 1)
        w_q, w_k, w_d, w_p, w_m = (
            w[:, :d],
            w[:, d : 2 * d],
            w[:, 2 * d : 3 * d],
            w[:, 3 * d : 4 * d],
            w[:, 4 * d],
        )
        per_row = q @ (w_q + w_d).T + first.bias  # (B, H)
        per_key = torch.cat([k, q[:, None, :] * k], dim=-1) @ torch.cat([w_k - w_d, w_p], 1).T
        h = per_key + per_row[:, None, :] + match[:, :, None] * w_m  # (B, N, H)
        out: Tensor = rest(h).squeeze(-1)
        return out

    def forward(
        self, query: Tensor, keys: Tensor, seq: Tensor, seq_age: Tensor | None, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``query`` = e(target) (B, D), ``keys`` = e(seq) (B, N, D), ``seq`` int64 (B, N)
        (0 = padding), ``seq_age`` float (B, N) seconds or None, ``target`` int64 (B,) the
        candidate's bucket -> pooled (B, D), summary (B, SUMMARY)."""
        buckets = age_buckets(seq, seq_age)
        k = keys + self.age(buckets)
        valid = (seq > 0).to(k.dtype)
        match = (seq == target[:, None]).to(k.dtype) * valid  # (B, N)
        w = torch.sigmoid(self._scores(query, k, match)) * valid  # (B, N)
        pooled = (w[:, :, None] * k).sum(1)
        recency = (match * 2.0 / (1.0 + buckets.to(k.dtype))).amax(1)
        mass = w.sum(1)
        if self.log_mass:
            mass = torch.log1p(mass)
        summary = torch.stack([mass, torch.log1p(match.sum(1)), recency], dim=1)
        return pooled, summary


class PairCrosses(nn.Module):
    """A hashed scalar weight per (user, item) pair: ``w[h(cat_0, cat_1)]``.

    ``cat``: int64 (B, Fc) (slot 0 = user, slot 1 = item) -> (B,). A pair with either side
    absent (bucket 0) contributes 0; weights start at zero. It memorises each user x item
    pair beyond the low-rank ``<e(user), e(item)>`` (Vowpal Wabbit's ``-q ui``).

    Only user x item: crossing the user with every other field (user x position, user x
    segment, user x item category, ...) at this learning rate cost 0.05-0.06 NE on
    ``bench.history_models``' logs (per-user noise), where user x item alone is neutral on
    the synthetic log and a small gain on the history world.

    Example:
        >>> pc = PairCrosses(100)
        >>> pc(torch.tensor([[3, 4, 9], [0, 4, 5]])).tolist()
        [0.0, 0.0]
    """

    def __init__(self, num_buckets: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.weights = nn.Embedding(num_buckets, 1, padding_idx=0)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Zero weights (no randomness; ``generator`` accepted for symmetry)."""
        with torch.no_grad():
            self.weights.weight.zero_()

    def buckets(self, cat: Tensor) -> Tensor:
        """Pair buckets int64 (B,) in ``[0, num_buckets)``, 0 where a side is absent."""
        user, item = cat[:, 0], cat[:, 1]
        h = (user * _PAIR_A + item * _PAIR_B + _PAIR_C) % (self.num_buckets - 1) + 1
        return torch.where((user > 0) & (item > 0), h, 0)

    def forward(self, cat: Tensor) -> Tensor:
        return _PAIR_SCALE * self.weights(self.buckets(cat)).squeeze(-1)


class Behaviour(nn.Module):
    """The optional behaviour parts a model owns: ``attention`` and ``pairs`` (or None)."""

    def __init__(
        self,
        num_buckets: int,
        dim: int,
        sequence: bool,
        pair_crosses: bool,
        attention_log_mass: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.attention = TargetAttention(dim, log_mass=attention_log_mass) if sequence else None
        self.pairs = PairCrosses(num_buckets) if pair_crosses else None

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        if self.attention is not None:
            self.attention.reset_parameters(generator)
        if self.pairs is not None:
            self.pairs.reset_parameters(generator)

    @property
    def extra_fields(self) -> int:
        """Embedding fields added to the model's input (the pooled vector)."""
        return 0 if self.attention is None else 1

    @property
    def extra_numerics(self) -> int:
        """Numeric columns added to the model's input (the attention summary)."""
        return 0 if self.attention is None else TargetAttention.SUMMARY

    def input_width(self, num_cat_fields: int, num_num_fields: int) -> int:
        """Width of the flat model input over these parts: ``(Fc + extra_fields) * D + Fn +
        extra_numerics`` for ``Fc`` categorical and ``Fn`` numeric fields."""
        return (
            (num_cat_fields + self.extra_fields) * self.dim + num_num_fields + self.extra_numerics
        )

    def inputs(
        self,
        embedding: nn.Embedding,
        emb: Tensor,
        cat: Tensor,
        num: Tensor,
        seq: Tensor | None,
        seq_age: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Field embeddings (B, Fc, D) and numerics (B, Fn) -> with attention
        ``(B, Fc + 1, D)`` (the pooled vector last) and ``(B, Fn + SUMMARY)``; unchanged
        without. No sequence (``seq`` None) pools to zeros."""
        if self.attention is None:
            return emb, num
        b = emb.shape[0]
        if seq is None or seq.shape[1] == 0:
            pooled = emb.new_zeros(b, self.dim)
            summary = num.new_zeros(b, TargetAttention.SUMMARY)
        else:
            # Each distinct item's row once: the sparse gradient then has one entry per
            # distinct item, not B x N (coalescing those dominated the step).
            uniq, inverse = torch.unique(seq, return_inverse=True)
            keys = embedding(uniq)[inverse]  # (B, N, D)
            pooled, summary = self.attention(emb[:, 1], keys, seq, seq_age, cat[:, 1])
        fields = torch.cat([emb, pooled[:, None, :].to(emb.dtype)], dim=1)
        return fields, torch.cat([num, summary.to(num.dtype)], dim=1)

    def pair_logit(self, cat: Tensor) -> Tensor | float:
        return 0.0 if self.pairs is None else self.pairs(cat)
