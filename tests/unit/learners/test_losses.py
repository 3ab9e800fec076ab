from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.losses import (
    LOSSES,
    bce_with_logits,
    bpr_loss,
    combined_pair_loss,
    focal_loss_with_logits,
    info_nce_loss,
    ranknet_loss,
    sampled_softmax_loss,
    weighted_bce_with_logits,
)


def naive_focal(x: float, t: float, gamma: float, alpha: float | None) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    p_t = p if t == 1 else 1.0 - p
    a_t = 1.0 if alpha is None else (alpha if t == 1 else 1.0 - alpha)
    return -a_t * (1.0 - p_t) ** gamma * math.log(p_t)


def naive_bce(x: float, t: float) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


batches = st.integers(min_value=1, max_value=32).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-8, 8), min_size=n, max_size=n),
        st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n),
        st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n),
    )
)


@settings(max_examples=30, deadline=None)
@given(batches, st.sampled_from(["mean", "sum", "none"]))
def test_bce_matches_naive_formula(batch: tuple, reduction: str) -> None:
    xs, ts, ws = batch
    per = np.array([w * naive_bce(x, t) for x, t, w in zip(xs, ts, ws, strict=True)])
    expected = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    got = bce_with_logits(
        torch.tensor(xs, dtype=torch.float64),
        torch.tensor(ts, dtype=torch.float64),
        weights=torch.tensor(ws, dtype=torch.float64),
        reduction=reduction,
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    batches,
    st.sampled_from([0.0, 0.5, 2.0, 3.0]),
    st.one_of(st.none(), st.floats(0.05, 0.95)),
)
def test_focal_matches_naive_formula(batch: tuple, gamma: float, alpha: float | None) -> None:
    xs, ts, _ = batch
    expected = np.array([naive_focal(x, t, gamma, alpha) for x, t in zip(xs, ts, strict=True)])
    got = focal_loss_with_logits(
        torch.tensor(xs, dtype=torch.float64),
        torch.tensor(ts, dtype=torch.float64),
        gamma=gamma,
        alpha=alpha,
        reduction="none",
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(batches)
def test_focal_with_gamma_zero_and_no_alpha_equals_bce(batch: tuple) -> None:
    xs, ts, ws = batch
    x, t, w = (torch.tensor(v, dtype=torch.float64) for v in (xs, ts, ws))
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            focal_loss_with_logits(x, t, gamma=0.0, weights=w, reduction=reduction),
            bce_with_logits(x, t, weights=w, reduction=reduction),
        )


def test_bce_logit_gradient_of_negative_example_is_sigmoid() -> None:
    x = torch.linspace(-6, 6, 25, dtype=torch.float64, requires_grad=True)
    bce_with_logits(x, torch.zeros(25, dtype=torch.float64), reduction="sum").backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()))


def test_bce_is_stable_for_extreme_logits() -> None:
    loss = bce_with_logits(
        torch.tensor([100.0, -100.0]), torch.tensor([1.0, 0.0]), reduction="none"
    )
    assert torch.isfinite(loss).all() and float(loss.max()) < 1e-30


def test_focal_downweights_easy_examples_relative_to_bce() -> None:
    x, t = torch.tensor([-4.0]), torch.tensor([0.0])  # confidently correct negative
    assert float(focal_loss_with_logits(x, t, gamma=2.0)) < 1e-3 * float(bce_with_logits(x, t))


def test_unknown_reduction_is_rejected() -> None:
    with pytest.raises(ValueError, match="reduction"):
        bce_with_logits(torch.zeros(2), torch.zeros(2), reduction="avg")


# -- naive references: plain Python loops over floats ----------------------------------------
def softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def naive_weighted_bce(x: float, t: float, pos_weight: float) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    return -(pos_weight * t * math.log(p) + (1 - t) * math.log(1 - p))


def naive_ranknet_pairs(xs: list, ts: list, ws: list) -> list[float]:
    return [
        ws[i] * ws[j] * softplus(-(xs[i] - xs[j]))
        for i in range(len(xs))
        for j in range(len(xs))
        if ts[i] > ts[j]
    ]


def reduce_list(per: list[float], reduction: str) -> np.ndarray | float:
    if reduction == "none":
        return np.array(per)
    if reduction == "sum":
        return sum(per)
    return sum(per) / max(len(per), 1)


def naive_log_softmax_at(row: list[float], k: int) -> float:
    m = max(row)
    return row[k] - m - math.log(sum(math.exp(v - m) for v in row))


def t64(v: object) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


REDUCTIONS = st.sampled_from(["mean", "sum", "none"])


@settings(max_examples=30, deadline=None)
@given(batches, st.floats(0.1, 20.0), REDUCTIONS)
def test_weighted_bce_matches_naive_formula(batch: tuple, pos_weight: float, red: str) -> None:
    xs, ts, ws = batch
    per = [w * naive_weighted_bce(x, t, pos_weight) for x, t, w in zip(xs, ts, ws, strict=True)]
    expected = {"mean": np.mean(per), "sum": np.sum(per), "none": np.array(per)}[red]
    got = weighted_bce_with_logits(t64(xs), t64(ts), pos_weight, weights=t64(ws), reduction=red)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(batches)
def test_weighted_bce_with_unit_pos_weight_equals_bce(batch: tuple) -> None:
    xs, ts, ws = batch
    torch.testing.assert_close(
        weighted_bce_with_logits(t64(xs), t64(ts), 1.0, weights=t64(ws)),
        bce_with_logits(t64(xs), t64(ts), weights=t64(ws)),
    )


def test_weighted_bce_rejects_non_positive_pos_weight() -> None:
    with pytest.raises(ValueError, match="pos_weight"):
        weighted_bce_with_logits(torch.zeros(2), torch.zeros(2), pos_weight=0.0)


@settings(max_examples=40, deadline=None)
@given(batches, REDUCTIONS)
def test_ranknet_matches_naive_pair_loop(batch: tuple, reduction: str) -> None:
    xs, ts, ws = batch
    expected = reduce_list(naive_ranknet_pairs(xs, ts, ws), reduction)
    got = ranknet_loss(t64(xs), t64(ts), weights=t64(ws), reduction=reduction)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_ranknet_without_pairs_is_zero_with_a_graph(label: float) -> None:
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    for reduction in ("mean", "sum"):
        loss = ranknet_loss(x, torch.full((5,), label, dtype=torch.float64), reduction=reduction)
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))
    assert ranknet_loss(x, torch.zeros(5), reduction="none").shape == (0,)


def test_ranknet_depends_only_on_score_differences() -> None:
    x, t = t64([0.3, -1.0, 2.0, 0.0]), t64([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(ranknet_loss(x, t), ranknet_loss(x + 5.0, t))


@pytest.mark.parametrize("bad", ["target", "weight"])
def test_pairwise_losses_are_nan_when_a_target_or_weight_is_not_finite(bad: str) -> None:
    x, t, w = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.ones(4)
    (t if bad == "target" else w)[2] = float("nan")
    assert torch.isnan(ranknet_loss(x, t, weights=w))
    assert torch.isnan(combined_pair_loss(x, t, weights=w))


@settings(max_examples=30, deadline=None)
@given(batches, st.floats(0.0, 1.0), st.sampled_from(["mean", "sum"]))
def test_combined_pair_is_alpha_mix_of_naive_bce_and_ranknet(
    batch: tuple, alpha: float, reduction: str
) -> None:
    xs, ts, ws = batch
    bce = [w * naive_bce(x, t) for x, t, w in zip(xs, ts, ws, strict=True)]
    bce_red = sum(bce) if reduction == "sum" else sum(bce) / len(bce)
    rank = reduce_list(naive_ranknet_pairs(xs, ts, ws), reduction)
    expected = alpha * bce_red + (1 - alpha) * float(rank)
    got = combined_pair_loss(t64(xs), t64(ts), alpha, weights=t64(ws), reduction=reduction)
    np.testing.assert_allclose(float(got), expected, rtol=1e-9, atol=1e-12)


def test_combined_pair_rejects_bad_alpha_and_per_example_reduction() -> None:
    with pytest.raises(ValueError, match="alpha"):
        combined_pair_loss(torch.zeros(2), torch.zeros(2), alpha=1.5)
    with pytest.raises(ValueError, match="reduction"):
        combined_pair_loss(torch.zeros(2), torch.zeros(2), reduction="none")


def _negative_logit_grads(alpha: float | None) -> torch.Tensor:
    """|d loss / d s_j| for the 50 negatives of 1 positive + 50 negatives near logit(0.02)."""
    base = math.log(0.02 / 0.98)
    jitter = torch.linspace(-0.05, 0.05, 51, dtype=torch.float64)
    x = (base + jitter).requires_grad_(True)
    t = torch.zeros(51, dtype=torch.float64)
    t[0] = 1.0
    if alpha is None:
        loss = bce_with_logits(x, t)
    else:
        loss = combined_pair_loss(x, t, alpha=alpha)
    (grad,) = torch.autograd.grad(loss, x)
    return grad[1:].abs()


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_combined_pair_gives_sparse_negatives_larger_gradients_than_bce(alpha: float) -> None:
    # KDD'24 (Shi et al.): with sparse positives the BCE gradient on a negative's logit is
    # sigmoid(s_j) ~ CTR, small; the RankNet term adds sigmoid(s_j - s_i) ~ 1/2 per pair.
    # Both reduced by "mean", as in training; any alpha < 1 must enlarge every negative's.
    bce = _negative_logit_grads(None)
    combined = _negative_logit_grads(alpha)
    assert bool((combined > bce).all())
    # The ranking term dominates: even alpha = 0.9 more than doubles the gradient here.
    assert float(combined.min()) > 2 * float(bce.max())


def test_combined_pair_with_alpha_one_has_the_bce_gradient() -> None:
    torch.testing.assert_close(_negative_logit_grads(1.0), _negative_logit_grads(None))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda b: st.tuples(
            st.lists(st.floats(-6, 6), min_size=b, max_size=b),
            st.integers(0, 4).flatmap(
                lambda k: st.lists(
                    st.lists(st.floats(-6, 6), min_size=k, max_size=k), min_size=b, max_size=b
                )
            ),
        )
    ),
    REDUCTIONS,
)
def test_bpr_matches_naive_formula(batch: tuple, reduction: str) -> None:
    pos, negs = batch
    per = [[softplus(-(p - n)) for n in row] for p, row in zip(pos, negs, strict=True)]
    flat = [v for row in per for v in row]
    expected = {"none": np.array(per), "sum": sum(flat), "mean": np.mean(flat) if flat else 0}
    got = bpr_loss(t64(pos), t64(negs).reshape(len(pos), -1), reduction=reduction)
    if reduction == "mean" and not flat:
        return  # mean of zero terms is NaN, as in torch
    np.testing.assert_allclose(got.numpy(), expected[reduction], rtol=1e-9, atol=1e-12)


def test_bpr_accepts_one_negative_per_positive() -> None:
    pos, neg = t64([1.0, -2.0]), t64([0.5, 3.0])
    torch.testing.assert_close(
        bpr_loss(pos, neg, reduction="none"), bpr_loss(pos, neg[:, None], reduction="none")[:, 0]
    )
    expected = [softplus(-(1.0 - 0.5)), softplus(-(-2.0 - 3.0))]
    np.testing.assert_allclose(bpr_loss(pos, neg, reduction="none").numpy(), expected)


embeddings = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(embeddings, st.floats(0.05, 2.0), REDUCTIONS)
def test_info_nce_matches_naive_softmax(shape: tuple, temperature: float, red: str) -> None:
    b, d, seed = shape
    q, k = _randn((b, d), seed), _randn((b, d), seed + 1)
    ql, kl = q.tolist(), k.tolist()
    per = []
    for i in range(b):
        row = [
            sum(qa * ka for qa, ka in zip(ql[i], kl[j], strict=True)) / temperature
            for j in range(b)
        ]
        per.append(-naive_log_softmax_at(row, i))
    got = info_nce_loss(q, k, temperature=temperature, reduction=red)
    np.testing.assert_allclose(got.numpy(), reduce_list(per, red), rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(embeddings, st.integers(0, 5), st.floats(0.1, 2.0), REDUCTIONS)
def test_sampled_softmax_matches_naive_logq_corrected_softmax(
    shape: tuple, n_neg: int, temperature: float, red: str
) -> None:
    b, d, seed = shape
    q, kp, kn = _randn((b, d), seed), _randn((b, d), seed + 1), _randn((n_neg, d), seed + 2)
    lqp = -_randn((b,), seed + 3).abs() - 1.0
    lqn = -_randn((n_neg,), seed + 4).abs() - 1.0

    def dot(u: list[float], v: list[float]) -> float:
        return sum(a * c for a, c in zip(u, v, strict=True))

    per = []
    for i in range(b):
        row = [dot(q[i].tolist(), kp[i].tolist()) / temperature - float(lqp[i])]
        row += [
            dot(q[i].tolist(), kn[j].tolist()) / temperature - float(lqn[j]) for j in range(n_neg)
        ]
        per.append(-naive_log_softmax_at(row, 0))
    got = sampled_softmax_loss(q, kp, kn, lqp, lqn, temperature=temperature, reduction=red)
    np.testing.assert_allclose(got.numpy(), reduce_list(per, red), rtol=1e-9, atol=1e-12)


def test_logq_correction_lowers_the_loss_against_popular_negatives() -> None:
    q = k = torch.ones(1, 2, dtype=torch.float64)
    uniform = sampled_softmax_loss(q, k, k.repeat(3, 1), t64([-1.0]), t64([-1.0] * 3))
    popular = sampled_softmax_loss(q, k, k.repeat(3, 1), t64([-1.0]), t64([-0.1] * 3))
    assert float(popular) < float(uniform)
    np.testing.assert_allclose(float(uniform), math.log(4))  # equal logits over 1 + 3


def test_excluded_negatives_drop_out_of_the_sampled_softmax() -> None:
    q, kp, kn = _randn((3, 4), 1), _randn((3, 4), 2), _randn((5, 4), 3)
    lqp, lqn = -_randn((3,), 4).abs(), -_randn((5,), 5).abs()
    exclude = torch.zeros(3, 5, dtype=torch.bool)
    exclude[0, 1] = exclude[2, 4] = True
    got = sampled_softmax_loss(q, kp, kn, lqp, lqn, 0.5, reduction="none", exclude=exclude)
    for i in range(3):
        keep = ~exclude[i]
        want = sampled_softmax_loss(q[i : i + 1], kp[i : i + 1], kn[keep], lqp[i : i + 1],
                                    lqn[keep], 0.5)  # fmt: skip
        np.testing.assert_allclose(float(got[i]), float(want), rtol=1e-12)
    assert float(got[0]) != float(sampled_softmax_loss(q, kp, kn, lqp, lqn, 0.5, "none")[0])
    with pytest.raises(ValueError, match="exclude must have shape"):
        sampled_softmax_loss(q, kp, kn, lqp, lqn, exclude=exclude[:, :2])


def test_loss_registry_names() -> None:
    assert set(LOSSES) == {"bce", "weighted_bce", "focal", "ranknet", "combined_pair", "fnw", "dfm"}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registry_losses_share_the_positional_signature(name: str) -> None:
    x, t, w = t64([0.5, -1.0, 2.0]), t64([1.0, 0.0, 0.0]), t64([1.0, 2.0, 0.5])
    by_position = LOSSES[name](x, t, w, "sum")
    by_keyword = LOSSES[name](x, t, weights=w, reduction="sum")
    assert by_position.shape == () and torch.isfinite(by_position)
    torch.testing.assert_close(by_position, by_keyword)


def test_registry_entries_take_their_extra_parameters_by_keyword() -> None:
    x, t = t64([0.5, -1.0, 2.0]), t64([1.0, 0.0, 0.0])
    torch.testing.assert_close(
        LOSSES["weighted_bce"](x, t, pos_weight=3.0), weighted_bce_with_logits(x, t, 3.0)
    )
    torch.testing.assert_close(
        LOSSES["focal"](x, t, gamma=1.0, alpha=0.25), focal_loss_with_logits(x, t, 1.0, 0.25)
    )
    torch.testing.assert_close(
        LOSSES["combined_pair"](x, t, alpha=0.2), combined_pair_loss(x, t, 0.2)
    )
