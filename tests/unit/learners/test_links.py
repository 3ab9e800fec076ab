"""Output corrections: each maps a loss's population minimiser back to the true CTR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.links import calibrated_logits, fnc_correct, focal_calibrated_logits
from learners.losses import LOSSES

GRID = torch.linspace(-14.0, 8.0, 220_001, dtype=torch.float64)


def minimiser(loss: str, p: float, **params: float) -> float:
    """Naive reference: the logit minimising the expected loss at CTR p, by grid search."""
    ones, zeros = torch.ones_like(GRID), torch.zeros_like(GRID)
    fn = LOSSES[loss]
    expected = p * fn(GRID, ones, reduction="none", **params) + (1 - p) * fn(
        GRID, zeros, reduction="none", **params
    )
    return float(GRID[int(expected.argmin())])


@pytest.mark.parametrize("p", [0.004, 0.05, 0.3, 0.9])
@pytest.mark.parametrize(
    ("loss", "params"),
    [
        ("focal", {"gamma": 2.0}),
        ("focal", {"gamma": 0.5}),
        ("focal", {"gamma": 1.0, "alpha": 0.25}),
        ("weighted_bce", {"pos_weight": 4.0}),
        ("bce", {}),
    ],
)
def test_correction_maps_the_loss_minimiser_back_to_the_true_ctr(
    loss: str, params: dict[str, float], p: float
) -> None:
    x = minimiser(loss, p, **params)
    corrected = calibrated_logits(np.array([x]), loss, **params)[0]
    assert 1 / (1 + math.exp(-corrected)) == pytest.approx(p, rel=2e-3)


def test_focal_at_default_settings_over_predicts_a_five_percent_ctr_about_fivefold() -> None:
    # Why the correction exists: the raw focal output at CTR 0.05 is about 0.25.
    raw = 1 / (1 + math.exp(-minimiser("focal", 0.05, gamma=2.0)))
    assert 4.0 < raw / 0.05 < 6.0


@settings(max_examples=50, deadline=None)
@given(
    gamma=st.floats(0.0, 6.0),
    alpha=st.none() | st.floats(0.01, 0.99),
    x=st.lists(st.floats(-60.0, 60.0), min_size=2, max_size=20),
)
def test_focal_correction_is_finite_and_non_decreasing(
    gamma: float, alpha: float | None, x: list[float]
) -> None:
    xs = np.sort(np.array(x))
    out = focal_calibrated_logits(xs, gamma, alpha)
    assert out.shape == xs.shape and np.all(np.isfinite(out))
    assert np.all(np.diff(out) >= 0)


def test_gamma_zero_without_alpha_and_other_losses_are_the_identity() -> None:
    x = np.linspace(-10, 10, 11)
    np.testing.assert_array_equal(focal_calibrated_logits(x, 0.0, None), x)
    for loss in ("bce", "ranknet", "combined_pair"):
        np.testing.assert_array_equal(calibrated_logits(x, loss), x)


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="gamma"):
        focal_calibrated_logits(np.zeros(2), -1.0)
    with pytest.raises(ValueError, match="alpha"):
        focal_calibrated_logits(np.zeros(2), 2.0, 1.0)


def _fake_negative_batches(n_batches: int = 4, size: int = 32) -> list[tuple[list, np.ndarray]]:
    """Batches of a fake-negative stream: every impression a negative, some clicks again."""
    rng = np.random.default_rng(3)
    out = []
    for k in range(n_batches):
        rows = [{"user_id": f"u{rng.integers(8)}", "item_id": f"i{rng.integers(12)}"}
                for _ in range(size)]  # fmt: skip
        y = (rng.random(size) < 0.1 + 0.05 * k).astype(np.float64)
        out.append((rows, y))
    return out


def test_fnc_link_serves_what_fnc_then_the_calibrator_served() -> None:
    from dataclasses import replace

    from learners.calibration import PlattCalibrator
    from learners.encoding import EncoderConfig
    from learners.ranker import RankerConfig, TorchRanker

    # the model's own scores (no fallback mixture: it mixes in the label space)
    cfg = RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=256), device="cpu",
                       fallback_mixture=False)  # fmt: skip
    plain, linked = TorchRanker(cfg, seed=0), TorchRanker(replace(cfg, fnc=True), seed=0)
    for rows, y in _fake_negative_batches():
        before = plain.score_and_learn(rows, y)
        # the progressive-validation scores go through the link once, training does not
        np.testing.assert_array_equal(linked.score_and_learn(rows, y), fnc_correct(before))
    for (name, a), b in zip(plain.model.state_dict().items(),
                            linked.model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    test = [{"user_id": f"u{k}", "item_id": f"i{k}"} for k in range(8)]
    cal = PlattCalibrator(a=1.3, b=-0.2)
    b = plain.predict_proba_many(test)
    assert np.all((b > 0.0) & (b < 0.5))  # so 0, 1 and 2 corrections all differ
    served = cal.transform(linked.predict_proba_many(test))
    np.testing.assert_array_equal(served, cal.transform(fnc_correct(b)))  # the old path
    assert not np.allclose(served, cal.transform(b))  # not applied
    assert not np.allclose(served, cal.transform(fnc_correct(fnc_correct(b))))  # not twice


@pytest.mark.parametrize("loss", ["focal", "fnw", "weighted_bce"])
def test_the_fnc_link_is_for_plain_bce_only(loss: str) -> None:
    from learners.ranker import RankerConfig

    with pytest.raises(ValueError, match="fnc corrects plain BCE"):
        RankerConfig(loss=loss, fnc=True)


def test_fnc_correct_is_one_function_in_links_and_delayed_feedback() -> None:
    import learners.delayed_feedback as df

    assert df.fnc_correct is fnc_correct
    np.testing.assert_array_equal(fnc_correct([0.2, 0.5, -0.1]), [0.25, 1.0, 0.0])
