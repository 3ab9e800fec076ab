from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.losses import LOSSES, bce_with_logits, focal_loss_with_logits


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


def test_loss_registry_names() -> None:
    assert set(LOSSES) == {"bce", "focal"}
