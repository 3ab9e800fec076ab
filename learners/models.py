"""CTR ranking models over hashed categorical buckets plus numeric features.

Every model maps ``cat``: int64 ``(B, Fc)`` bucket ids (0 = padding/absent) and ``num``:
float32 ``(B, Fn)`` to logits ``(B,)``. Categorical slot 0 is ``user_id`` and slot 1 is
``item_id``; both models add ``<e(user), e(item)>`` (rows of ``self.embedding``) to the
logit so that user and item embeddings are meaningful for inner-product retrieval.

Models have no dropout or batch norm, so train-mode and eval-mode forwards are identical.
Parameters are initialised by ``reset_parameters(generator)`` so that randomness is owned
by the caller (no global seeding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["DCNv2", "LogisticModel", "INITIAL_CTR"]

INITIAL_CTR = 0.03
_INITIAL_BIAS = math.log(INITIAL_CTR / (1 - INITIAL_CTR))
_EMB_STD = 0.05


def _user_item_dot(embedding: nn.Embedding, cat: Tensor) -> Tensor:
    """``<e(cat[:, 0]), e(cat[:, 1])>``: (B,). Absent ids hit the zero padding row."""
    e = embedding(cat[:, :2])  # (B, 2, D)
    return (e[:, 0] * e[:, 1]).sum(-1)


def _init_embedding(emb: nn.Embedding, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        nn.init.normal_(emb.weight, 0.0, std, generator=generator)
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()


def _init_linear(lin: nn.Linear, generator: torch.Generator | None) -> None:
    nn.init.xavier_uniform_(lin.weight, generator=generator)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


class LogisticModel(nn.Module):
    """Logistic regression on hashed buckets and numerics, plus a user x item dot term.

    ``logit = bias + sum_f w[cat_f] + v . num + <e(user), e(item)>``.

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
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
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

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn) -> logits float32 (B,)."""
        logit = self.weights(cat).squeeze(-1).sum(-1) + self.bias
        if self.num_num_fields:
            logit = logit + self.numeric(num).squeeze(-1)
        return logit + _user_item_dot(self.embedding, cat)


class CrossLayer(nn.Module):
    """Full-rank DCN-v2 cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l``; (B, d) -> (B, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x


class DCNv2(nn.Module):
    """DCN-v2 (Wang et al. 2021), parallel structure, plus a user x item dot term.

    ``x0 = [e(cat_1), ..., e(cat_Fc), num]`` (B, Fc*D + Fn) feeds a stack of cross layers
    and, in parallel, an MLP; a final linear layer maps ``[x_L, h]`` to the logit.

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
    ) -> None:
        super().__init__()
        self.num_cat_fields = num_cat_fields
        self.num_num_fields = num_num_fields
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        d0 = num_cat_fields * embedding_dim + num_num_fields
        self.cross = nn.ModuleList(CrossLayer(d0) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        width = d0
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(d0 + width, 1)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier linears, small random embeddings, head bias = logit(INITIAL_CTR)."""
        _init_embedding(self.embedding, _EMB_STD, generator)
        for layer in self.cross:
            assert isinstance(layer, CrossLayer)
            _init_linear(layer.linear, generator)
        for module in self.deep:
            if isinstance(module, nn.Linear):
                _init_linear(module, generator)
        _init_linear(self.head, generator)
        with torch.no_grad():
            self.head.bias.fill_(_INITIAL_BIAS)

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        """``cat``: int64 (B, Fc), ``num``: float32 (B, Fn) -> logits float32 (B,)."""
        emb = self.embedding(cat)  # (B, Fc, D)
        x0 = torch.cat([emb.flatten(1), num], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        h = self.deep(x0)
        logit = self.head(torch.cat([x, h], dim=1)).squeeze(-1)
        dot = (emb[:, 0] * emb[:, 1]).sum(-1)
        return logit + dot
