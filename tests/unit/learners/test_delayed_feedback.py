"""FNW loss, FNC correction and the scheme/loss check for delayed feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.delayed_feedback import (
    DELAYED_FEEDBACK_LOSS,
    SCHEMES,
    check_loss_for_scheme,
    fake_negative_rate,
    fnc_correct,
)
from learners.losses import LOSSES, bce_with_logits, fnw_loss_with_logits

CTRS = (0.005, 0.04, 0.2, 0.5, 0.9)


def naive_fnw(x: float, t: float) -> float:
    f = 1.0 / (1.0 + math.exp(-x))
    return -(t * (1 + f) * math.log(f) + (1 - t) * (1 - f) * (1 + f) * math.log(1 - f))


batches = st.integers(min_value=1, max_value=32).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-8, 8), min_size=n, max_size=n),
        st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n),
        st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n),
    )
)


@settings(max_examples=50, deadline=None)
@given(batches, st.sampled_from(["mean", "sum", "none"]))
def test_fnw_matches_the_naive_per_example_formula(batch: tuple, reduction: str) -> None:
    xs, ts, ws = batch
    per = np.array([w * naive_fnw(x, t) for x, t, w in zip(xs, ts, ws, strict=True)])
    expected = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    got = fnw_loss_with_logits(
        torch.tensor(xs, dtype=torch.float64),
        torch.tensor(ts, dtype=torch.float64),
        weights=torch.tensor(ws, dtype=torch.float64),
        reduction=reduction,
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_fnw_is_registered_under_fnw_with_the_registry_signature() -> None:
    x, t = torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.0])
    assert LOSSES["fnw"](x, t, weights=None, reduction="sum") == fnw_loss_with_logits(
        x, t, reduction="sum"
    )


def test_fnw_stays_finite_for_extreme_logits() -> None:
    x = torch.tensor([-200.0, 200.0, -200.0, 200.0], requires_grad=True)
    loss = fnw_loss_with_logits(x, torch.tensor([1.0, 1.0, 0.0, 0.0]), reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all()


def test_fnw_rejects_an_unknown_reduction() -> None:
    with pytest.raises(ValueError, match="reduction"):
        fnw_loss_with_logits(torch.zeros(1), torch.zeros(1), reduction="avg")


def test_fnw_gradient_is_bce_gradient_times_the_importance_weight_held_constant() -> None:
    # no gradient flows through the weights: d/dz = w(f) * d BCE / dz with w(f) fixed
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    for target, weight in ((1.0, lambda f: 1 + f), (0.0, lambda f: (1 - f) * (1 + f))):
        t = torch.full_like(x, target)
        z1, z2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        fnw_loss_with_logits(z1, t, reduction="sum").backward()
        bce_with_logits(z2, t, reduction="sum").backward()
        assert z1.grad is not None and z2.grad is not None
        torch.testing.assert_close(z1.grad, weight(torch.sigmoid(x)) * z2.grad)


def test_fnw_pushes_a_positive_up_harder_and_a_negative_down_softer_than_bce() -> None:
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    for target in (1.0, 0.0):
        t = torch.full_like(x, target)
        z1, z2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        fnw_loss_with_logits(z1, t, reduction="sum").backward()
        bce_with_logits(z2, t, reduction="sum").backward()
        assert z1.grad is not None and z2.grad is not None
        if target == 1.0:  # descent raises the logit, by a factor 1 + f > 1
            assert (z1.grad < 0).all() and (z1.grad.abs() > z2.grad.abs()).all()
        else:  # descent lowers the logit, by a factor 1 - f^2 < 1
            assert (z1.grad > 0).all() and (z1.grad.abs() < z2.grad.abs()).all()


def _train_one_logit_per_ctr(loss: str, steps: int = 300) -> np.ndarray:
    """Gradient descent on the EXPECTED loss of the fake-negative stream, one logit per CTR.

    An impression of CTR ``p`` appears once as a negative and, with probability ``p``, once
    more as a positive: the expectation is the loss on (z, 1) weighted ``p`` plus the loss
    on (z, 0) weighted 1. Rprop (sign-based, per coordinate: the CTRs train independently)
    shrinks its step at every overshoot, so it settles precisely where the gradient
    changes sign, i.e. at the stationary point, even though FNW's weights move with ``z``.
    """
    p = torch.tensor(CTRS, dtype=torch.float64)
    z = torch.zeros_like(p, requires_grad=True)
    opt = torch.optim.Rprop([z], lr=0.1)
    targets = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    weights = torch.cat([p, torch.ones_like(p)])
    for _ in range(steps):
        opt.zero_grad()
        LOSSES[loss](torch.cat([z, z]), targets, weights=weights, reduction="sum").backward()
        opt.step()
    return torch.sigmoid(z).detach().numpy()


def test_fnw_on_the_fake_negative_stream_converges_to_the_true_ctr() -> None:
    np.testing.assert_allclose(_train_one_logit_per_ctr("fnw"), CTRS, atol=1e-4)


def test_bce_on_the_fake_negative_stream_converges_to_p_over_one_plus_p() -> None:
    learned = _train_one_logit_per_ctr("bce")
    np.testing.assert_allclose(learned, fake_negative_rate(CTRS), atol=1e-4)
    np.testing.assert_allclose(fnc_correct(learned), CTRS, atol=1e-4)  # FNC undoes it


def test_fnw_expected_gradient_vanishes_exactly_at_the_true_ctr() -> None:
    p = torch.tensor(CTRS, dtype=torch.float64)
    z = torch.logit(p).requires_grad_()
    targets = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    weights = torch.cat([p, torch.ones_like(p)])
    fnw_loss_with_logits(torch.cat([z, z]), targets, weights=weights, reduction="sum").backward()
    assert z.grad is not None
    torch.testing.assert_close(z.grad, torch.zeros_like(p), atol=1e-12, rtol=0)


def test_fnc_correct_maps_the_fake_negative_rate_back_to_the_ctr() -> None:
    p = np.linspace(0.0, 1.0, 101)
    b = p / (1 + p)
    np.testing.assert_allclose(fnc_correct(b), p, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fake_negative_rate(p), b)


def test_fnc_correct_clips_to_the_unit_interval_and_keeps_the_shape() -> None:
    got = fnc_correct(np.array([[-0.1, 0.5], [0.75, 1.0]]))
    assert got.shape == (2, 2)
    np.testing.assert_array_equal(got, [[0.0, 1.0], [1.0, 1.0]])
    assert np.isnan(fnc_correct([math.nan]))[0]


@pytest.mark.parametrize(
    ("scheme", "loss", "fnc"),
    [
        ("fake_negative", "fnw", False),
        ("fake_negative", "bce", True),
        ("window", "bce", False),
        ("window", "focal", False),
        ("window", "combined_pair", False),
    ],
)
def test_check_loss_for_scheme_accepts_the_calibrated_combinations(
    scheme: str, loss: str, fnc: bool
) -> None:
    check_loss_for_scheme(scheme, loss, fnc=fnc)


@pytest.mark.parametrize(
    ("scheme", "loss", "fnc", "message"),
    [
        ("fake_negative", "bce", False, "learns p / \\(1 \\+ p\\)"),
        ("fake_negative", "focal", False, "needs loss 'fnw'"),
        ("fake_negative", "focal", True, "needs loss 'fnw'"),
        ("fake_negative", "fnw", True, "correct twice"),
        ("window", "fnw", False, "assumes the fake-negative stream"),
        ("window", "bce", True, "does not have"),
        ("eventually", "bce", False, "unknown delayed_feedback scheme"),
        ("window", "hinge", False, "unknown loss"),
    ],
)
def test_check_loss_for_scheme_rejects_biased_combinations_with_a_clear_message(
    scheme: str, loss: str, fnc: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_loss_for_scheme(scheme, loss, fnc=fnc)


def test_recommended_loss_of_each_scheme_passes_the_check() -> None:
    assert set(DELAYED_FEEDBACK_LOSS) == set(SCHEMES)
    for scheme, loss in DELAYED_FEEDBACK_LOSS.items():
        check_loss_for_scheme(scheme, loss or "bce")
