"""CTR ranking models over hashed categorical buckets plus numeric features.

Every model maps ``cat``: int64 ``(B, Fc)`` bucket ids (0 = padding/absent) and ``num``:
float32 ``(B, Fn)`` to logits ``(B,)``. Categorical slot 0 is ``user_id`` and slot 1 is
``item_id``; every model adds ``<e(user), e(item)>`` (rows of ``self.embedding``, the shared
``nn.Embedding(num_buckets, embedding_dim, padding_idx=0)``) to the (click) logit so that
user and item embeddings are meaningful for inner-product retrieval. The final bias starts
at ``logit(INITIAL_CTR)``; every model exposes it as ``output_bias`` (the click logit's
additive scalar parameter) so that a caller can re-centre it, e.g. on an observed CTR.

Behaviour (optional, off unless built with it): ``sequence=True`` adds DIN-style target
attention (:class:`TargetAttention`) of the candidate item over the user's recent clicks
``seq``: int64 ``(B, N)`` item buckets (hashed as ``item_id``, so they index the same rows
of ``self.embedding`` as the candidate; 0 = padding) with ``seq_age``: float32 ``(B, N)``
ages in seconds (-1 = unknown); the pooled ``(B, D)`` vector joins the deep (and cross / FM)
input as one more field. A row with an empty sequence, or ``seq=None``, pools to the zero
vector. ``pair_crosses=True`` adds :class:`PairCrosses`, a hashed scalar weight per
(user, item) pair, to the click logit (the memorisation of Vowpal Wabbit's ``-q ui``).

The multi-task :class:`MMoE` also has ``forward_tasks(cat, num) -> (B, T)`` logits; its
``forward`` returns task 0 (click).

Models have no dropout or batch norm, so train-mode and eval-mode forwards are identical.
Parameters are initialised by ``reset_parameters(generator)`` so that randomness is owned
by the caller (no global seeding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "DCNv2",
    "DeepFM",
    "INITIAL_CTR",
    "LogisticModel",
    "MMoE",
    "PairCrosses",
    "TargetAttention",
    "WideAndDeep",
]

INITIAL_CTR = 0.03
_INITIAL_BIAS = math.log(INITIAL_CTR / (1 - INITIAL_CTR))
_EMB_STD = 0.05


def _user_item_dot(embedding: nn.Embedding, cat: Tensor) -> Tensor:
    """``<e(cat[:, 0]), e(cat[:, 1])>``: (B,). Absent ids hit the zero padding row."""
    return _pair_dot(embedding(cat[:, :2]))  # (B, 2, D) -> (B,)


def _init_embedding(emb: nn.Embedding, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        nn.init.normal_(emb.weight, 0.0, std, generator=generator)
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()


def _init_linear(lin: nn.Linear, generator: torch.Generator | None) -> None:
    nn.init.xavier_uniform_(lin.weight, generator=generator)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


def _mlp(width: int, hidden: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """``Linear -> ReLU`` per entry of ``hidden``; returns the stack and its output width."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width


def _init_linears(module: nn.Module, generator: torch.Generator | None) -> None:
    """Xavier-initialise every ``nn.Linear`` inside ``module`` (in registration order)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _init_linear(m, generator)


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
    mass ``sum_j mask_j w_j``, ``log1p(#j: m_j)`` (clicks on this very item) and the recency
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

    def __init__(self, dim: int, hidden: int = _ATTENTION_HIDDEN) -> None:
        super().__init__()
        self.age = nn.Embedding(N_AGE_BUCKETS, dim, padding_idx=0)
        self.unit = nn.Sequential(nn.Linear(4 * dim + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Small age embeddings (padding row zero), Xavier activation unit."""
        _init_embedding(self.age, _EMB_STD, generator)
        _init_linears(self.unit, generator)

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
        summary = torch.stack([w.sum(1), torch.log1p(match.sum(1)), recency], dim=1)
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


class _Behaviour(nn.Module):
    """The optional behaviour parts a model owns: ``attention`` and ``pairs`` (or None)."""

    def __init__(self, num_buckets: int, dim: int, sequence: bool, pair_crosses: bool) -> None:
        super().__init__()
        self.dim = dim
        self.attention = TargetAttention(dim) if sequence else None
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


def _fields_x0(emb: Tensor, num: Tensor) -> Tensor:
    """``[e(cat_1), ..., e(cat_Fc), num]``: (B, Fc, D) and (B, Fn) -> (B, Fc*D + Fn)."""
    return torch.cat([emb.flatten(1), num], dim=1)


def _pair_dot(emb: Tensor) -> Tensor:
    """``<e(user), e(item)>`` from the field embeddings (B, Fc, D) -> (B,)."""
    return (emb[:, 0] * emb[:, 1]).sum(-1)


class _HeadModel(nn.Module):
    """A model whose click logit leaves through ``self.head`` (a ``Linear(width, 1)``)."""

    head: nn.Linear

    def _reset_head(self, generator: torch.Generator | None) -> None:
        _init_linear(self.head, generator)
        with torch.no_grad():
            self.head.bias.fill_(_INITIAL_BIAS)

    @property
    def output_bias(self) -> nn.Parameter:
        """The click logit's additive bias parameter (shape ``(1,)``)."""
        return self.head.bias


class LogisticModel(nn.Module):
    """Logistic regression on hashed buckets and numerics, plus a user x item dot term.

    ``logit = bias + sum_f w[cat_f] + v . num + <e(user), e(item)>`` (+ the
    :class:`PairCrosses` term with ``pair_crosses``; it reads no sequence).

    Example:
        >>> m = LogisticModel(num_buckets=100, num_cat_fields=3, num_num_fields=2,
        ...                   generator=torch.Generator().manual_seed(0))
        >>> m(torch.tensor([[5, 7, 0]]), torch.zeros(1, 2)).shape
        torch.Size([1])
    """

    def __init__(
        self,
        num_buckets: int,
        num_cat_fields: int,
        num_num_fields: int,
        embedding_dim: int = 16,
        generator: torch.Generator | None = None,
        pair_crosses: bool = False,
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.behaviour = _Behaviour(num_buckets, embedding_dim, False, pair_crosses)
        self.weights = nn.Embedding(num_buckets, 1, padding_idx=0)
        self.numeric = nn.Linear(num_num_fields, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Zero linear weights, small random embeddings, bias = logit(INITIAL_CTR)."""
        with torch.no_grad():
            self.weights.weight.zero_()
            self.numeric.weight.zero_()
            self.bias.fill_(_INITIAL_BIAS)
        _init_embedding(self.embedding, _EMB_STD, generator)
        self.behaviour.reset_parameters(generator)

    @property
    def output_bias(self) -> nn.Parameter:
        """The click logit's additive bias parameter (shape ``()``)."""
        return self.bias

    def forward(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn), optional ``seq`` int64 (B, N) and
        ``seq_age`` float32 (B, N) (see the module docstring) -> logits float32 (B,)."""
        logit = self.weights(cat).squeeze(-1).sum(-1) + self.bias
        if self.num_num_fields:
            logit = logit + self.numeric(num).squeeze(-1)
        return logit + _user_item_dot(self.embedding, cat) + self.behaviour.pair_logit(cat)


class CrossLayer(nn.Module):
    """Full-rank DCN-v2 cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l``; (B, d) -> (B, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x


class DCNv2(_HeadModel):
    """DCN-v2 (Wang et al. 2021), parallel structure, plus a user x item dot term.

    ``x0 = [e(cat_1), ..., e(cat_Fc), num]`` (B, Fc*D + Fn) feeds a stack of cross layers
    and, in parallel, an MLP; a final linear layer maps ``[x_L, h]`` to the logit. With
    ``sequence`` the attention-pooled behaviour vector is one more field of ``x0``, so the
    cross layers can form its products with the candidate's embedding.

    Example:
        >>> m = DCNv2(num_buckets=100, num_cat_fields=3, num_num_fields=2, embedding_dim=4,
        ...           hidden=(8,), generator=torch.Generator().manual_seed(0))
        >>> m(torch.tensor([[5, 7, 0], [1, 0, 0]]), torch.zeros(2, 2)).shape
        torch.Size([2])
    """

    def __init__(
        self,
        num_buckets: int,
        num_cat_fields: int,
        num_num_fields: int,
        embedding_dim: int = 16,
        cross_layers: int = 2,
        hidden: tuple[int, ...] = (128, 64),
        generator: torch.Generator | None = None,
        sequence: bool = False,
        pair_crosses: bool = False,
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.behaviour = _Behaviour(num_buckets, embedding_dim, sequence, pair_crosses)
        d0 = (
            (num_cat_fields + self.behaviour.extra_fields) * embedding_dim
            + num_num_fields
            + self.behaviour.extra_numerics
        )
        self.cross = nn.ModuleList(CrossLayer(d0) for _ in range(cross_layers))
        self.deep, width = _mlp(d0, hidden)
        self.head = nn.Linear(d0 + width, 1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier linears, small random embeddings, head bias = logit(INITIAL_CTR)."""
        _init_embedding(self.embedding, _EMB_STD, generator)
        _init_linears(self.cross, generator)
        _init_linears(self.deep, generator)
        self._reset_head(generator)
        self.behaviour.reset_parameters(generator)

    def forward(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn), optional ``seq`` int64 (B, N) and
        ``seq_age`` float32 (B, N) (see the module docstring) -> logits float32 (B,)."""
        emb = self.embedding(cat)  # (B, Fc, D)
        fields, nums = self.behaviour.inputs(self.embedding, emb, cat, num, seq, seq_age)
        x0 = x = _fields_x0(fields, nums)
        for layer in self.cross:
            x = layer(x0, x)
        h = self.deep(x0)
        logit = self.head(torch.cat([x, h], dim=1)).squeeze(-1) + _pair_dot(emb)
        return logit + self.behaviour.pair_logit(cat)


class WideAndDeep(_HeadModel):
    """Wide & Deep (Cheng et al. 2016), plus a user x item dot term.

    Wide: a scalar weight per bucket and a linear numeric term (memorisation, as in
    :class:`LogisticModel`). Deep: an MLP over ``[e(cat_1), ..., e(cat_Fc), num]``
    (B, Fc*D + Fn) into a linear head whose bias starts at ``logit(INITIAL_CTR)``.
    ``logit = wide + deep + <e(user), e(item)>``.

    Example:
        >>> m = WideAndDeep(num_buckets=100, num_cat_fields=3, num_num_fields=2,
        ...                 embedding_dim=4, hidden=(8,),
        ...                 generator=torch.Generator().manual_seed(0))
        >>> m(torch.tensor([[5, 7, 0], [1, 0, 0]]), torch.zeros(2, 2)).shape
        torch.Size([2])
    """

    def __init__(
        self,
        num_buckets: int,
        num_cat_fields: int,
        num_num_fields: int,
        embedding_dim: int = 16,
        hidden: tuple[int, ...] = (128, 64),
        generator: torch.Generator | None = None,
        sequence: bool = False,
        pair_crosses: bool = False,
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.wide = nn.Embedding(num_buckets, 1, padding_idx=0)
        self.wide_numeric = nn.Linear(num_num_fields, 1, bias=False)
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.behaviour = _Behaviour(num_buckets, embedding_dim, sequence, pair_crosses)
        width = (
            (num_cat_fields + self.behaviour.extra_fields) * embedding_dim
            + num_num_fields
            + self.behaviour.extra_numerics
        )
        self.deep, width = _mlp(width, hidden)
        self.head = nn.Linear(width, 1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Zero wide weights, Xavier deep linears, small embeddings, bias = logit(INITIAL_CTR)."""
        with torch.no_grad():
            self.wide.weight.zero_()
            self.wide_numeric.weight.zero_()
        _init_embedding(self.embedding, _EMB_STD, generator)
        _init_linears(self.deep, generator)
        self._reset_head(generator)
        self.behaviour.reset_parameters(generator)

    def forward(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn), optional ``seq`` int64 (B, N) and
        ``seq_age`` float32 (B, N) (see the module docstring) -> logits float32 (B,)."""
        wide = self.wide(cat).squeeze(-1).sum(-1)
        if self.num_num_fields:
            wide = wide + self.wide_numeric(num).squeeze(-1)
        wide = wide + self.behaviour.pair_logit(cat)
        emb = self.embedding(cat)  # (B, Fc, D)
        fields, nums = self.behaviour.inputs(self.embedding, emb, cat, num, seq, seq_age)
        deep = self.head(self.deep(_fields_x0(fields, nums))).squeeze(-1)
        return wide + deep + _pair_dot(emb)


class DeepFM(_HeadModel):
    """DeepFM (Guo et al. 2017): first order + FM second order + a deep MLP.

    Field vectors are ``e(cat_f)`` for categorical fields (absent: the zero padding row) and
    ``num_f * v_f`` for numeric fields, ``v_f`` learned. The FM term
    ``sum_{f < g} <x_f, x_g>`` is computed in O(F D) as
    ``((sum_f x_f)^2 - sum_f x_f^2).sum() / 2``; it contains ``<e(user), e(item)>`` with
    coefficient 1, which is the user x item dot term of the other models (not added twice).
    The deep MLP reads ``[e(cat_1), ..., e(cat_Fc), num]`` into a linear head whose bias
    starts at ``logit(INITIAL_CTR)``. With ``sequence`` the attention-pooled behaviour
    vector is one more field of both the FM term (so ``<pooled, e(item)>`` is in the logit)
    and the deep input.

    Example:
        >>> m = DeepFM(num_buckets=100, num_cat_fields=3, num_num_fields=2, embedding_dim=4,
        ...            hidden=(8,), generator=torch.Generator().manual_seed(0))
        >>> m(torch.tensor([[5, 7, 0], [1, 0, 0]]), torch.zeros(2, 2)).shape
        torch.Size([2])
    """

    def __init__(
        self,
        num_buckets: int,
        num_cat_fields: int,
        num_num_fields: int,
        embedding_dim: int = 16,
        hidden: tuple[int, ...] = (128, 64),
        generator: torch.Generator | None = None,
        sequence: bool = False,
        pair_crosses: bool = False,
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.first_order = nn.Embedding(num_buckets, 1, padding_idx=0)
        self.first_order_numeric = nn.Linear(num_num_fields, 1, bias=False)
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.numeric_embedding = nn.Parameter(torch.empty(num_num_fields, embedding_dim))
        self.behaviour = _Behaviour(num_buckets, embedding_dim, sequence, pair_crosses)
        width = (
            (num_cat_fields + self.behaviour.extra_fields) * embedding_dim
            + num_num_fields
            + self.behaviour.extra_numerics
        )
        self.deep, width = _mlp(width, hidden)
        self.head = nn.Linear(width, 1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Zero first order, small embeddings, Xavier linears, bias = logit(INITIAL_CTR)."""
        with torch.no_grad():
            self.first_order.weight.zero_()
            self.first_order_numeric.weight.zero_()
        _init_embedding(self.embedding, _EMB_STD, generator)
        nn.init.normal_(self.numeric_embedding, 0.0, _EMB_STD, generator=generator)
        _init_linears(self.deep, generator)
        self._reset_head(generator)
        self.behaviour.reset_parameters(generator)

    def forward(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn), optional ``seq`` int64 (B, N) and
        ``seq_age`` float32 (B, N) (see the module docstring) -> logits float32 (B,)."""
        first = self.first_order(cat).squeeze(-1).sum(-1) + self.behaviour.pair_logit(cat)
        emb = self.embedding(cat)  # (B, Fc, D)
        emb, nums = self.behaviour.inputs(self.embedding, emb, cat, num, seq, seq_age)
        fields = emb
        if self.num_num_fields:
            first = first + self.first_order_numeric(num).squeeze(-1)
            num_vecs = num[:, :, None] * self.numeric_embedding[None]  # (B, Fn, D)
            fields = torch.cat([emb, num_vecs], dim=1)
        fm = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(-1)
        deep = self.head(self.deep(_fields_x0(emb, nums))).squeeze(-1)
        return first + fm + deep


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al. 2018, KDD) over the shared embeddings.

    ``x0 = [e(cat_1), ..., e(cat_Fc), num]`` (B, Fc*D + Fn) feeds ``num_experts`` MLPs
    (layers ``hidden``) and one softmax gate per task; task ``t`` mixes the experts with its
    gate and maps the mixture through its tower (``Linear -> ReLU -> Linear``) to a logit
    whose bias starts at ``logit(INITIAL_CTR)``. Task 0 is the click and also gets
    ``<e(user), e(item)>``.

    Example:
        >>> m = MMoE(num_buckets=100, num_cat_fields=3, num_num_fields=2, embedding_dim=4,
        ...          hidden=(8,), num_experts=3, num_tasks=2,
        ...          generator=torch.Generator().manual_seed(0))
        >>> cat, num = torch.tensor([[5, 7, 0], [1, 0, 0]]), torch.zeros(2, 2)
        >>> m.forward_tasks(cat, num).shape, m(cat, num).shape
        (torch.Size([2, 2]), torch.Size([2]))
    """

    def __init__(
        self,
        num_buckets: int,
        num_cat_fields: int,
        num_num_fields: int,
        embedding_dim: int = 16,
        hidden: tuple[int, ...] = (128, 64),
        num_experts: int = 4,
        num_tasks: int = 2,
        generator: torch.Generator | None = None,
        sequence: bool = False,
        pair_crosses: bool = False,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MMoE needs at least one hidden layer per expert")
        if num_experts < 1 or num_tasks < 1:
            raise ValueError(f"need num_experts, num_tasks >= 1, got {num_experts}, {num_tasks}")
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.behaviour = _Behaviour(num_buckets, embedding_dim, sequence, pair_crosses)
        d0 = (
            (num_cat_fields + self.behaviour.extra_fields) * embedding_dim
            + num_num_fields
            + self.behaviour.extra_numerics
        )
        self.experts = nn.ModuleList(_mlp(d0, hidden)[0] for _ in range(num_experts))
        width = hidden[-1]
        self.gates = nn.ModuleList(nn.Linear(d0, num_experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
            for _ in range(num_tasks)
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Small embeddings, Xavier linears, tower output biases = logit(INITIAL_CTR)."""
        _init_embedding(self.embedding, _EMB_STD, generator)
        for group in (self.experts, self.gates, self.towers):
            _init_linears(group, generator)
        self.behaviour.reset_parameters(generator)
        with torch.no_grad():
            for tower in self.towers:
                assert isinstance(tower, nn.Sequential)
                out = tower[-1]
                assert isinstance(out, nn.Linear)
                out.bias.fill_(_INITIAL_BIAS)

    @property
    def output_bias(self) -> nn.Parameter:
        """The click (task 0) tower's output bias parameter (shape ``(1,)``)."""
        tower = self.towers[0]
        assert isinstance(tower, nn.Sequential)
        out = tower[-1]
        assert isinstance(out, nn.Linear)
        return out.bias

    def forward_tasks(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn), optional ``seq`` / ``seq_age``
        (B, N) -> logits float32 (B, T)."""
        emb = self.embedding(cat)  # (B, Fc, D)
        x0 = _fields_x0(*self.behaviour.inputs(self.embedding, emb, cat, num, seq, seq_age))
        experts = torch.stack([e(x0) for e in self.experts], dim=1)  # (B, E, H)
        logits = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            g = torch.softmax(gate(x0), dim=-1)  # (B, E)
            mixed = (g[:, :, None] * experts).sum(1)  # (B, H)
            logits.append(tower(mixed).squeeze(-1))
        out = torch.stack(logits, dim=1)  # (B, T)
        click = out[:, 0] + _pair_dot(emb) + self.behaviour.pair_logit(cat)
        return torch.cat([click[:, None], out[:, 1:]], dim=1)

    def forward(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """Click logits, float32 (B,): column 0 of :meth:`forward_tasks`."""
        return self.forward_tasks(cat, num, seq, seq_age)[:, 0]
