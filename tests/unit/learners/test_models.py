from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from learners.models import INITIAL_CTR, PLE, DCNv2, DeepFM, LogisticModel, MMoE, WideAndDeep

NB, FC, FN, D = 64, 4, 3, 4


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "logreg": lambda: LogisticModel(NB, FC, FN, embedding_dim=D, generator=_gen()),
    "wide_deep": lambda: WideAndDeep(NB, FC, FN, embedding_dim=D, hidden=(8,), generator=_gen()),
    "deepfm": lambda: DeepFM(NB, FC, FN, embedding_dim=D, hidden=(8,), generator=_gen()),
    "dcnv2": lambda: DCNv2(NB, FC, FN, embedding_dim=D, hidden=(8,), generator=_gen()),
    "mmoe": lambda: MMoE(
        NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=3, num_tasks=2, generator=_gen()
    ),
    "ple": lambda: PLE(
        NB,
        FC,
        FN,
        embedding_dim=D,
        hidden=(8,),
        num_experts=2,
        num_tasks=2,
        generator=_gen(),
        task_experts=1,
        levels=2,
    ),
    "mmoe_cross": lambda: MMoE(
        NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=2, num_tasks=2, generator=_gen(),
        cross_layers=2,
    ),
    "ple_cross": lambda: PLE(
        NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=2, num_tasks=2, generator=_gen(),
        task_experts=1, levels=1, cross_layers=1,
    ),
}  # fmt: skip


@pytest.fixture(params=list(BUILDERS))
def build(request: pytest.FixtureRequest) -> Callable[[], nn.Module]:
    return BUILDERS[request.param]


def _batch(b: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen()
    return torch.randint(0, NB, (b, FC), generator=g), torch.randn(b, FN, generator=g)


def test_forward_maps_batch_to_float32_logits(build: Callable[[], nn.Module]) -> None:
    cat, num = _batch()
    out = build()(cat, num)
    assert out.shape == (5,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_shared_embedding_has_a_zero_padding_row(build: Callable[[], nn.Module]) -> None:
    emb = build().embedding
    assert isinstance(emb, nn.Embedding)
    assert emb.weight.shape == (NB, D) and emb.padding_idx == 0
    assert torch.count_nonzero(emb.weight[0]) == 0


def test_empty_row_scores_near_initial_ctr_bias(build: Callable[[], nn.Module]) -> None:
    # All fields absent: the padding row and zero numerics leave (about) the final bias.
    model = build()
    with torch.no_grad():
        logit = model(torch.zeros(1, FC, dtype=torch.long), torch.zeros(1, FN))
    bias = math.log(INITIAL_CTR / (1 - INITIAL_CTR))
    # Hidden ReLU layers with zero input and zero biases output 0, so the bias is exact.
    torch.testing.assert_close(float(logit), bias, rtol=0, atol=1e-6)


def _silence_deep_part(model: nn.Module) -> None:
    """Zero the final layer's weights so only its bias (and the shallow terms) remain."""
    with torch.no_grad():
        if isinstance(model, MMoE):
            for tower in model.towers:
                assert isinstance(tower, nn.Sequential)
                out = tower[-1]
                assert isinstance(out, nn.Linear)
                out.weight.zero_()
            for head in model.cross_heads:
                assert isinstance(head, nn.Linear)
                head.weight.zero_()
        elif isinstance(model, WideAndDeep | DeepFM | DCNv2):
            model.head.weight.zero_()


def test_logit_is_bias_plus_user_item_dot_when_nothing_else_is_present(
    build: Callable[[], nn.Module],
) -> None:
    model = build()
    _silence_deep_part(model)
    cat = torch.tensor([[3, 5, 0, 0], [3, 0, 0, 0]])  # row 1: item absent -> dot 0
    emb = model.embedding
    assert isinstance(emb, nn.Embedding)
    with torch.no_grad():
        logits = model(cat, torch.zeros(2, FN))
    dot = float((emb.weight[3] * emb.weight[5]).sum().detach())
    bias = math.log(INITIAL_CTR / (1 - INITIAL_CTR))
    torch.testing.assert_close(logits, torch.tensor([bias + dot, bias]), rtol=0, atol=1e-6)


def test_deepfm_fm_term_equals_naive_pairwise_sum() -> None:
    model = DeepFM(NB, FC, FN, embedding_dim=D, hidden=(8,), generator=_gen())
    cat, num = _batch(3)
    with torch.no_grad():
        fields = torch.cat([model.embedding(cat), num[:, :, None] * model.numeric_embedding], 1)
        naive = torch.zeros(3)
        n_fields = fields.shape[1]
        for f in range(n_fields):
            for g in range(f + 1, n_fields):
                naive += (fields[:, f] * fields[:, g]).sum(-1)
        first = model.first_order(cat).squeeze(-1).sum(-1) + model.first_order_numeric(num)[:, 0]
        emb = model.embedding(cat)
        deep = model.head(model.deep(torch.cat([emb.flatten(1), num], 1)))[:, 0]
        torch.testing.assert_close(model(cat, num), first + naive + deep)


def test_mmoe_forward_is_task_zero_of_forward_tasks() -> None:
    model = MMoE(NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=3, num_tasks=3)
    cat, num = _batch()
    tasks = model.forward_tasks(cat, num)
    assert tasks.shape == (5, 3)
    torch.testing.assert_close(model(cat, num), tasks[:, 0])


@pytest.mark.parametrize("kind", ["mmoe", "mmoe_cross", "ple", "ple_cross"])
def test_multitask_forward_is_the_click_of_forward_tasks(kind: str) -> None:
    # MMoE's forward runs the click's gate, tower and cross layers only: same logits
    model = BUILDERS[kind]()
    assert isinstance(model, MMoE)
    cat, num = _batch()
    torch.testing.assert_close(model(cat, num), model.forward_tasks(cat, num)[:, 0])


def test_mmoe_gates_mix_experts_per_task() -> None:
    model = MMoE(NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=2, num_tasks=2)
    assert len(model.experts) == 2 and len(model.gates) == 2 and len(model.towers) == 2
    with pytest.raises(ValueError, match="hidden"):
        MMoE(NB, FC, FN, hidden=())


@pytest.mark.parametrize("kind", ["mmoe_cross", "ple_cross"])
def test_multitask_cross_layers_are_each_tasks_own(kind: str) -> None:
    # each task has its own cross stack and head (DCN-v2's cross network): one task's
    # loss never moves the other's, while both reach the shared embeddings
    cat, num = _batch()
    for task in (0, 1):
        model = BUILDERS[kind]()
        assert isinstance(model, MMoE) and len(model.cross) == len(model.cross_heads) == 2
        model.forward_tasks(cat, num)[:, task].sum().backward()
        for t in (0, 1):
            grads = [
                p.grad for p in [*model.cross[t].parameters(), *model.cross_heads[t].parameters()]
            ]
            if t == task:
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
            else:  # zeros through the stacking of the tasks' logits
                assert all(g is None or g.abs().sum() == 0 for g in grads)
        assert model.embedding.weight.grad is not None


def test_multitask_models_without_cross_layers_keep_their_old_layout() -> None:
    # cross_layers=0 builds the model as written before the cross layers (its checkpoints)
    model = MMoE(NB, FC, FN, embedding_dim=D, hidden=(8,), num_experts=2, num_tasks=2)
    assert not any(name.startswith("cross") for name, _ in model.named_parameters())


def test_reset_parameters_with_the_same_generator_seed_is_reproducible(
    build: Callable[[], nn.Module],
) -> None:
    a, b = build(), build()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
