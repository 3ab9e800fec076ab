"""CTR ranking models over hashed categorical buckets plus numeric features.

Every model maps ``cat``: int64 ``(B, Fc)`` bucket ids (0 = padding/absent) and ``num``:
float32 ``(B, Fn)`` to logits ``(B,)``. Categorical slot 0 is ``user_id`` and slot 1 is
``item_id``; every model adds ``<e(user), e(item)>`` (rows of ``self.embedding``, the shared
``nn.Embedding(num_buckets, embedding_dim, padding_idx=0)``) to the (click) logit so that
user and item embeddings are meaningful for inner-product retrieval. The final bias starts
at ``logit(INITIAL_CTR)``; every model exposes it as ``output_bias`` (the click logit's
additive scalar parameter) so that a caller can re-centre it, e.g. on an observed CTR.

Behaviour (optional, off unless built with it): ``sequence=True`` adds DIN-style target
attention (:class:`~learners.layers.TargetAttention`) of the candidate item over the user's
recent clicks ``seq``: int64 ``(B, N)`` item buckets (hashed as ``item_id``, so they index
the same rows of ``self.embedding`` as the candidate; 0 = padding) with ``seq_age``: float32
``(B, N)`` ages in seconds (-1 = unknown); the pooled ``(B, D)`` vector joins the deep (and
cross / FM) input as one more field. A row with an empty sequence, or ``seq=None``, pools to
the zero vector. ``pair_crosses=True`` adds :class:`~learners.layers.PairCrosses`, a hashed scalar
weight per (user, item) pair, to the click logit (the memorisation of Vowpal Wabbit's
``-q ui``). These parts and the parameter initialisers live in :mod:`learners.layers`.

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

from learners.layers import (
    EMB_STD,
    Behaviour,
    init_embedding,
    init_linear,
    init_linears,
    mlp,
)

__all__ = [
    "DCNv2",
    "DeepFM",
    "DelayHead",
    "INITIAL_CTR",
    "LogisticModel",
    "MMoE",
    "WideAndDeep",
]

INITIAL_CTR = 0.03
_INITIAL_BIAS = math.log(INITIAL_CTR / (1 - INITIAL_CTR))


def _user_item_dot(embedding: nn.Embedding, cat: Tensor) -> Tensor:
    """``<e(cat[:, 0]), e(cat[:, 1])>``: (B,). Absent ids hit the zero padding row."""
    return _pair_dot(embedding(cat[:, :2]))  # (B, 2, D) -> (B,)


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
        init_linear(self.head, generator)
        with torch.no_grad():
            self.head.bias.fill_(_INITIAL_BIAS)

    @property
    def output_bias(self) -> nn.Parameter:
        """The click logit's additive bias parameter (shape ``(1,)``)."""
        return self.head.bias


class LogisticModel(nn.Module):
    """Logistic regression on hashed buckets and numerics, plus a user x item dot term.

    ``logit = bias + sum_f w[cat_f] + v . num + <e(user), e(item)>`` (+ the
    :class:`~learners.layers.PairCrosses` term with ``pair_crosses``; it reads no sequence).

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
        self.behaviour = Behaviour(num_buckets, embedding_dim, False, pair_crosses)
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
        init_embedding(self.embedding, EMB_STD, generator)
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


class DelayHead(nn.Module):
    """The click-delay head of a DFM ranker (Chapelle 2014): a linear model over the same
    hashed buckets and numerics, ``g = bias + sum_f w[cat_f] + v . num``, the log of the
    delay's Exponential rate (``loss="dfm"``, :func:`learners.losses.dfm_loss`).

    Small on purpose: one scalar per bucket (no embedding vectors), so it adds
    ``num_buckets + num_num_fields + 1`` parameters to the ranker. Starts at ``g = 0``
    everywhere: a mean delay of one time unit (``RankerConfig.delay_scale_s``).

    Example:
        >>> h = DelayHead(num_buckets=100, num_num_fields=2)
        >>> h(torch.tensor([[5, 7, 0]]), torch.zeros(1, 2))
        tensor([0.], grad_fn=<AddBackward0>)
    """

    def __init__(self, num_buckets: int, num_num_fields: int) -> None:
        super().__init__()
        self.num_num_fields = num_num_fields
        self.weights = nn.Embedding(num_buckets, 1, padding_idx=0)
        self.numeric = nn.Linear(num_num_fields, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        with torch.no_grad():
            self.weights.weight.zero_()
            self.numeric.weight.zero_()

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn) -> log-rates float32 (B,)."""
        g = self.weights(cat).squeeze(-1).sum(-1) + self.bias
        if self.num_num_fields:
            g = g + self.numeric(num).squeeze(-1)
        return g


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
        attention_log_mass: bool = False,
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.behaviour = Behaviour(
            num_buckets, embedding_dim, sequence, pair_crosses, attention_log_mass
        )
        d0 = self.behaviour.input_width(num_cat_fields, num_num_fields)
        self.cross = nn.ModuleList(CrossLayer(d0) for _ in range(cross_layers))
        self.deep, width = mlp(d0, hidden)
        self.head = nn.Linear(d0 + width, 1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier linears, small random embeddings, head bias = logit(INITIAL_CTR)."""
        init_embedding(self.embedding, EMB_STD, generator)
        init_linears(self.cross, generator)
        init_linears(self.deep, generator)
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
        attention_log_mass: bool = False,
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.wide = nn.Embedding(num_buckets, 1, padding_idx=0)
        self.wide_numeric = nn.Linear(num_num_fields, 1, bias=False)
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.behaviour = Behaviour(
            num_buckets, embedding_dim, sequence, pair_crosses, attention_log_mass
        )
        width = self.behaviour.input_width(num_cat_fields, num_num_fields)
        self.deep, width = mlp(width, hidden)
        self.head = nn.Linear(width, 1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Zero wide weights, Xavier deep linears, small embeddings, bias = logit(INITIAL_CTR)."""
        with torch.no_grad():
            self.wide.weight.zero_()
            self.wide_numeric.weight.zero_()
        init_embedding(self.embedding, EMB_STD, generator)
        init_linears(self.deep, generator)
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
        attention_log_mass: bool = False,
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.first_order = nn.Embedding(num_buckets, 1, padding_idx=0)
        self.first_order_numeric = nn.Linear(num_num_fields, 1, bias=False)
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        self.numeric_embedding = nn.Parameter(torch.empty(num_num_fields, embedding_dim))
        self.behaviour = Behaviour(
            num_buckets, embedding_dim, sequence, pair_crosses, attention_log_mass
        )
        width = self.behaviour.input_width(num_cat_fields, num_num_fields)
        self.deep, width = mlp(width, hidden)
        self.head = nn.Linear(width, 1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Zero first order, small embeddings, Xavier linears, bias = logit(INITIAL_CTR)."""
        with torch.no_grad():
            self.first_order.weight.zero_()
            self.first_order_numeric.weight.zero_()
        init_embedding(self.embedding, EMB_STD, generator)
        nn.init.normal_(self.numeric_embedding, 0.0, EMB_STD, generator=generator)
        init_linears(self.deep, generator)
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
    ``<e(user), e(item)>``. With ``cross_layers`` (the ranker passes its ``cross_layers``,
    2 by default) each task also owns a stack of DCN-v2 cross layers over ``x0`` whose
    output a linear head adds to the task's logit, as :class:`DCNv2`'s head adds its cross
    part: without them MMoE was 0.004-0.005 NE behind DCN-v2 on the click of the
    synthetic two-label world, with them level (``bench.multitask``); on the MovieLens dev
    log (its first 150k impressions, no history features, 2 seeds) 0.0021-0.0034 behind
    without them, 0.0016-0.0022 with them. Per task, so that a sparse second label does not move
    the click's crosses (a shared stack cost the click NE there). ``cross_layers = 0``
    is the layout of checkpoints written before (2026-12-07).

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
        attention_log_mass: bool = False,
        cross_layers: int = 0,
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
        self.behaviour = Behaviour(
            num_buckets, embedding_dim, sequence, pair_crosses, attention_log_mass
        )
        d0 = self.behaviour.input_width(num_cat_fields, num_num_fields)
        self.experts = nn.ModuleList(mlp(d0, hidden)[0] for _ in range(num_experts))
        width = hidden[-1]
        self.gates = nn.ModuleList(nn.Linear(d0, num_experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
            for _ in range(num_tasks)
        )
        # per task (when cross_layers): its own stack of cross layers and a linear head
        self.cross = nn.ModuleList(
            nn.ModuleList(CrossLayer(d0) for _ in range(cross_layers))
            for _ in range(num_tasks if cross_layers else 0)
        )
        self.cross_heads = nn.ModuleList(
            nn.Linear(d0, 1, bias=False) for _ in range(num_tasks if cross_layers else 0)
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Small embeddings, Xavier linears, tower output biases = logit(INITIAL_CTR)."""
        init_embedding(self.embedding, EMB_STD, generator)
        for group in (self.experts, self.gates, self.towers, self.cross, self.cross_heads):
            init_linears(group, generator)
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
        return self.task_bias(0)

    def task_bias(self, task: int) -> nn.Parameter:
        """Task ``task``'s tower output bias parameter (shape ``(1,)``)."""
        tower = self.towers[task]
        assert isinstance(tower, nn.Sequential)
        out = tower[-1]
        assert isinstance(out, nn.Linear)
        return out.bias

    def forward_tasks(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn), optional ``seq`` / ``seq_age``
        (B, N) -> logits float32 (B, T)."""
        return self._first_tasks(cat, num, seq, seq_age, self.num_tasks)

    def _first_tasks(
        self, cat: Tensor, num: Tensor, seq: Tensor | None, seq_age: Tensor | None, n: int
    ) -> Tensor:
        """The logits of tasks ``0..n-1`` only, float32 (B, n): the other tasks' gates,
        towers and cross layers are not run (:meth:`forward` needs the click alone; PLE
        overrides this)."""
        emb = self.embedding(cat)  # (B, Fc, D)
        x0 = _fields_x0(*self.behaviour.inputs(self.embedding, emb, cat, num, seq, seq_age))
        experts = torch.stack([e(x0) for e in self.experts], dim=1)  # (B, E, H)
        logits = []
        for gate, tower in zip(self.gates[:n], self.towers[:n], strict=True):
            g = torch.softmax(gate(x0), dim=-1)  # (B, E)
            mixed = (g[:, :, None] * experts).sum(1)  # (B, H)
            logits.append(tower(mixed).squeeze(-1))
        out = self._plus_cross(torch.stack(logits, dim=1), x0)  # (B, n)
        click = out[:, 0] + _pair_dot(emb) + self.behaviour.pair_logit(cat)
        return torch.cat([click[:, None], out[:, 1:]], dim=1)

    def _plus_cross(self, out: Tensor, x0: Tensor) -> Tensor:
        """The first tasks' tower logits ``out`` (B, n) plus each one's linear head over its
        own cross layers' output (DCN-v2's cross layers over ``x0`` (B, d0)); ``out`` as
        it is without cross layers."""
        if not self.cross:
            return out
        n = out.shape[1]
        heads = []
        for stack, head in zip(self.cross[:n], self.cross_heads[:n], strict=True):
            assert isinstance(stack, nn.ModuleList)
            x = x0
            for layer in stack:
                x = layer(x0, x)
            heads.append(head(x))
        return out + torch.cat(heads, dim=1)

    def forward(
        self, cat: Tensor, num: Tensor, seq: Tensor | None = None, seq_age: Tensor | None = None
    ) -> Tensor:
        """Click logits, float32 (B,): column 0 of :meth:`forward_tasks`, without running
        the other tasks."""
        return self._first_tasks(cat, num, seq, seq_age, 1)[:, 0]


class PLE(MMoE):
    """Progressive layered extraction (Tang et al. 2020, RecSys): MMoE whose tasks also own
    experts, so that a task's private signal need not pass through the shared ones.

    Each of ``levels`` extraction levels holds ``num_experts`` shared experts and
    ``task_experts`` experts of each task's own. Task ``t``'s gate mixes its own experts
    and the shared ones; below the last level a shared gate mixes every expert for the next
    level's shared experts, and task ``t``'s mixture feeds its own experts there. The first
    level's experts are MLPs of ``hidden`` over ``x0`` (as MMoE's), later levels'
    ``Linear -> ReLU`` of ``hidden[-1]``. Towers, each task's cross layers, the click's
    pair term and the output biases are MMoE's (:meth:`MMoE.task_bias`). ``levels = 1`` is
    CGC (the paper's single level).

    Example:
        >>> m = PLE(num_buckets=100, num_cat_fields=3, num_num_fields=2, embedding_dim=4,
        ...         hidden=(8,), num_experts=2, num_tasks=2, task_experts=1, levels=2,
        ...         generator=torch.Generator().manual_seed(0))
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
        attention_log_mass: bool = False,
        task_experts: int = 2,
        levels: int = 2,
        cross_layers: int = 0,
    ) -> None:
        if task_experts < 1 or levels < 1:
            raise ValueError(f"need task_experts, levels >= 1, got {task_experts}, {levels}")
        super().__init__(
            num_buckets, num_cat_fields, num_num_fields, embedding_dim, hidden, num_experts,
            num_tasks, generator, sequence, pair_crosses, attention_log_mass, cross_layers,
        )  # fmt: skip
        self.task_experts = task_experts
        self.levels = levels
        d0 = self.behaviour.input_width(num_cat_fields, num_num_fields)
        width = hidden[-1]
        per_level = num_experts + num_tasks * task_experts
        # per level: the shared experts, then task 0's, task 1's, ...
        self.experts = nn.ModuleList(
            nn.ModuleList(
                (mlp(d0, hidden) if level == 0 else mlp(width, (width,)))[0]
                for _ in range(per_level)
            )
            for level in range(levels)
        )
        # per level: each task's gate, then (below the last level) the shared gate
        self.gates = nn.ModuleList(
            nn.ModuleList(
                [
                    nn.Linear(d0 if level == 0 else width, task_experts + num_experts)
                    for _ in range(num_tasks)
                ]
                + (
                    [nn.Linear(d0 if level == 0 else width, per_level)]
                    if level < levels - 1
                    else []
                )
            )  # fmt: skip
            for level in range(levels)
        )
        self.reset_parameters(generator)

    def _first_tasks(
        self, cat: Tensor, num: Tensor, seq: Tensor | None, seq_age: Tensor | None, n: int
    ) -> Tensor:
        """The logits of tasks ``0..n-1``, float32 (B, n) (:meth:`MMoE.forward_tasks` and
        :meth:`MMoE.forward` call it). Every task runs: each level's experts feed the
        next level's shared experts, so the click needs them all."""
        emb = self.embedding(cat)  # (B, Fc, D)
        x0 = _fields_x0(*self.behaviour.inputs(self.embedding, emb, cat, num, seq, seq_age))
        e, k, n_tasks = self.num_experts, self.task_experts, self.num_tasks
        inputs, shared_in = [x0] * n_tasks, x0
        for level in range(self.levels):
            experts = self.experts[level]
            gates = self.gates[level]
            assert isinstance(experts, nn.ModuleList) and isinstance(gates, nn.ModuleList)
            shared = [experts[i](shared_in) for i in range(e)]
            own = [[experts[e + t * k + j](inputs[t]) for j in range(k)] for t in range(n_tasks)]
            mixed = []
            for t in range(n_tasks):
                g = torch.softmax(gates[t](inputs[t]), dim=-1)  # (B, k + E)
                mixed.append((g[:, :, None] * torch.stack(own[t] + shared, dim=1)).sum(1))
            if level < self.levels - 1:
                every = torch.stack([o for t_own in own for o in t_own] + shared, dim=1)
                g = torch.softmax(gates[n_tasks](shared_in), dim=-1)
                shared_in = (g[:, :, None] * every).sum(1)
            inputs = mixed
        towers = zip(self.towers, inputs, strict=True)
        out = torch.stack([tower(x).squeeze(-1) for tower, x in towers], dim=1)  # (B, T)
        out = self._plus_cross(out, x0)
        click = out[:, 0] + _pair_dot(emb) + self.behaviour.pair_logit(cat)
        return torch.cat([click[:, None], out[:, 1:n]], dim=1)
