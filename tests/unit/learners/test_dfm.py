"""DFM (Chapelle 2014): the loss, its recovery of a known CTR and delay rate on censored
data, the ranker's delay head and its persistence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from learners.calibration import PlattCalibrator
from learners.encoding import EncoderConfig
from learners.losses import LOSSES, bce_with_logits, dfm_loss
from learners.ranker import RankerConfig, TorchRanker
from modelstore.snapshot import load_snapshot, publish_snapshot
from modelstore.store import DirectoryStore

P, MEAN_DELAY_S, OBSERVE_S = 0.1, 600.0, 300.0


def censored(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and elapsed seconds as the ``"dfm"`` scheme releases them: a click within
    ``OBSERVE_S`` is a positive with its delay, everything else unclicked after
    ``OBSERVE_S`` (the true CTR ``P``, delays ~ Exponential(mean ``MEAN_DELAY_S``))."""
    rng = np.random.default_rng(seed)
    click = rng.random(n) < P
    delay = rng.exponential(MEAN_DELAY_S, size=n)
    seen = click & (delay <= OBSERVE_S)
    return seen.astype(np.float64), np.where(seen, delay, OBSERVE_S)


def compressed(y: np.ndarray, elapsed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same likelihood in two weighted rows (labels, elapsed s, weights summing to 2):
    the clicked term is linear in the delay, so the clicks' mean delay stands for them all,
    and every unclicked example has the same elapsed time."""
    clicked = y == 1
    labels = np.array([1.0, 0.0])
    times = np.array([float(elapsed[clicked].mean()), float(elapsed[~clicked][0])])
    assert np.all(elapsed[~clicked] == times[1])
    return labels, times, 2.0 * np.array([clicked.mean(), 1.0 - clicked.mean()])


def fit_constant(y: np.ndarray, elapsed: np.ndarray | None) -> tuple[float, float]:
    """(p, rate per second) of one logit and one log-rate fitted by L-BFGS (float64) to
    the DFM likelihood (``elapsed`` None: BCE on the observed labels)."""
    z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    g = torch.zeros((), dtype=torch.float64, requires_grad=True)
    if elapsed is None:
        t, w = (
            torch.tensor([1.0, 0.0], dtype=torch.float64),
            torch.from_numpy(2.0 * np.array([y.mean(), 1.0 - y.mean()])),
        )
        e = None
    else:
        labels, times, weights = compressed(y, elapsed)
        t, w = torch.from_numpy(labels), torch.from_numpy(weights)
        e = torch.from_numpy(times / OBSERVE_S)  # time unit: T
    opt = torch.optim.LBFGS([z, g], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = dfm_loss(z.expand(2), t, w, log_rate=g.expand(2), elapsed=e)
        loss.backward()
        return loss

    opt.step(closure)
    return float(torch.sigmoid(z.detach())), float(torch.exp(g.detach())) / OBSERVE_S


def test_dfm_recovers_the_ctr_and_the_delay_rate_where_bce_is_biased_low() -> None:
    y, elapsed = censored(400_000, seed=0)
    p, rate = fit_constant(y, elapsed)
    # tolerance: ~4 standard errors of the MLE at this n (seeds 0-4 stayed within 2)
    assert abs(p - P) < 0.01, p
    assert abs(1.0 / rate - MEAN_DELAY_S) / MEAN_DELAY_S < 0.15, 1.0 / rate
    # plain BCE on the same observed labels learns P(click within T) = p (1 - e^(-T/mean))
    p_bce, _ = fit_constant(y, None)
    seen_rate = P * (1.0 - math.exp(-OBSERVE_S / MEAN_DELAY_S))  # 0.039
    assert abs(p_bce - seen_rate) < 0.003 and p_bce < 0.5 * P


def test_dfm_loss_matches_the_naive_likelihood_and_stays_finite() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, generator=gen, dtype=torch.float64) * 2
    g = torch.randn(64, generator=gen, dtype=torch.float64)
    t = (torch.rand(64, generator=gen) < 0.5).double()
    e = torch.rand(64, generator=gen, dtype=torch.float64) * 3
    p, lam = torch.sigmoid(z), torch.exp(g)
    naive = torch.where(
        t > 0, -torch.log(p) - torch.log(lam) + lam * e, -torch.log(1 - p + p * torch.exp(-lam * e))
    )
    got = dfm_loss(z, t, log_rate=g, elapsed=e, reduction="none")
    torch.testing.assert_close(got, naive)
    # extreme logits, rates and elapsed times: finite values and gradients
    zx = torch.tensor([-80.0, 80.0, 0.0, 80.0, -80.0], requires_grad=True)
    gx = torch.tensor([60.0, -60.0, 60.0, 60.0, -60.0], requires_grad=True)
    tx = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    ex = torch.tensor([1e6, 1e6, 1e6, 1e-9, 1e6])
    loss = dfm_loss(zx, tx, log_rate=gx, elapsed=ex)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zx.grad).all() and torch.isfinite(gx.grad).all()  # type: ignore[arg-type]


def test_dfm_without_elapsed_times_is_bce_and_refuses_elapsed_without_rates() -> None:
    z, t = torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.0])
    torch.testing.assert_close(LOSSES["dfm"](z, t), bce_with_logits(z, t))
    with pytest.raises(ValueError, match="log_rate"):
        dfm_loss(z, t, elapsed=torch.ones(2))
    # a long observation without a click tends to BCE's -log(1 - p)
    far = dfm_loss(z, torch.zeros(2), log_rate=torch.zeros(2), elapsed=torch.full((2,), 100.0),
                   reduction="none")  # fmt: skip
    torch.testing.assert_close(far, bce_with_logits(z, torch.zeros(2), reduction="none"))


def _ranker(**kw: object) -> TorchRanker:
    cfg = RankerConfig(model="logreg", device="cpu", loss="dfm", bias_prior_strength=None,
                       encoder=EncoderConfig(num_buckets=256), **kw)  # type: ignore[arg-type]  # fmt: skip
    return TorchRanker(cfg, seed=0, online=False)


def test_the_ranker_learns_p_and_the_delay_from_censored_examples() -> None:
    """Through the ranker (its delay head, elapsed seconds / delay_scale_s, Adam): the
    same minimiser as L-BFGS on the likelihood, so the same recovery."""
    y, elapsed = censored(400_000, seed=0)
    p_mle, rate_mle = fit_constant(y, elapsed)
    labels, times, weights = compressed(y, elapsed)
    ranker = _ranker(base_lr=0.03)
    assert ranker.delay_head is not None
    rows = [{"user_id": "u", "item_id": "i"}] * 2
    for _ in range(250):
        ranker.learn_many(rows, labels, weights, elapsed=times)
    p = float(ranker.predict_proba_many(rows[:1])[0])
    mean_delay = 1.0 / float(ranker.predict_delay_rate_many(rows[:1])[0])
    assert abs(p - p_mle) < 0.002 and abs(p - P) < 0.01, (p, p_mle)  # observed: 0.039
    assert abs(mean_delay * rate_mle - 1.0) < 0.03, (mean_delay, 1.0 / rate_mle)
    assert abs(mean_delay - MEAN_DELAY_S) / MEAN_DELAY_S < 0.15


def test_elapsed_times_are_checked() -> None:
    ranker = _ranker()
    rows = [{"user_id": "u", "item_id": "i"}] * 2
    with pytest.raises(ValueError, match="elapsed"):
        ranker.learn_many(rows, np.array([1, 0]), elapsed=np.array([1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        ranker.learn_many(rows, np.array([1, 0]), elapsed=np.array([1.0, -1.0]))
    plain = TorchRanker(RankerConfig(model="logreg", device="cpu",
                                     encoder=EncoderConfig(num_buckets=256)))  # fmt: skip
    assert plain.delay_head is None and "delay_head" not in dict(plain.model.named_children())
    with pytest.raises(ValueError, match="no delay head"):
        plain.predict_delay_rate_many(rows)


def test_the_delay_head_round_trips_through_state_checkpoint_and_snapshot(tmp_path: Path) -> None:
    ranker = _ranker()
    rows = [{"user_id": f"u{k % 5}", "item_id": f"i{k % 7}"} for k in range(256)]
    y, elapsed = censored(256, seed=3)
    for _ in range(5):
        ranker.learn_many(rows, y, elapsed=elapsed)
    rates = ranker.predict_delay_rate_many(rows)
    assert not np.allclose(rates, 1.0 / 300.0)  # trained away from its start
    back = TorchRanker.from_state(ranker.state())
    np.testing.assert_array_equal(back.predict_delay_rate_many(rows), rates)
    ranker.save(tmp_path / "r.pt")
    loaded = TorchRanker.load(tmp_path / "r.pt")
    np.testing.assert_array_equal(loaded.predict_delay_rate_many(rows), rates)
    np.testing.assert_array_equal(loaded.predict_proba_many(rows), ranker.predict_proba_many(rows))
    # the optimiser moments of the head came back too: the next step is the same
    for r in (ranker, loaded):
        r.learn_many(rows, y, elapsed=elapsed)
    np.testing.assert_allclose(loaded.predict_delay_rate_many(rows),
                               ranker.predict_delay_rate_many(rows), rtol=1e-6)  # fmt: skip
    store = DirectoryStore(tmp_path / "store")
    m = publish_snapshot(store, ranker, None, None, PlattCalibrator(), calibrator_version=1)
    got = load_snapshot(store, m.version)
    np.testing.assert_array_equal(got.ranker.predict_delay_rate_many(rows),
                                  ranker.predict_delay_rate_many(rows))  # fmt: skip
    # continuing with another loss keeps the trained head (it is saved again)
    bce = TorchRanker.from_state(ranker.state(), loss="bce")
    assert bce.config.has_delay_head and bce.config.loss == "bce"


def test_loss_dfm_over_a_checkpoint_without_the_head_starts_the_head_afresh() -> None:
    # no fallback mixture: "dfm" serves none, and the two scores are compared exactly
    cfg = RankerConfig(model="logreg", device="cpu", encoder=EncoderConfig(num_buckets=256),
                       fallback_mixture=False)  # fmt: skip
    plain = TorchRanker(cfg, online=False)
    rows = [{"user_id": "u", "item_id": "i"}] * 4
    plain.learn_many(rows, np.array([1, 0, 0, 0]))
    warm = TorchRanker.from_state(plain.state(), online=True, loss="dfm")
    np.testing.assert_allclose(warm.predict_delay_rate_many(rows), 1.0 / 300.0)
    np.testing.assert_array_equal(warm.predict_proba_many(rows), plain.predict_proba_many(rows))
    warm.learn_many(rows, np.array([1, 0, 0, 0]), elapsed=np.array([5.0, 300, 300, 300]))
    assert warm.n_updates == 2


def test_pretrain_on_a_log_starts_and_trains_the_delay_head_on_its_click_delays(
    tmp_path: Path,
) -> None:
    from logs.offline import LogExamples, pretrain

    rng = np.random.default_rng(5)
    n = 4096
    y = (rng.random(n) < 0.2).astype(np.float64)
    delay = np.where(y == 1, rng.exponential(40.0, n), np.nan)
    rows: list[dict[str, object]] = [{"user_id": "u", "item_id": "i"}] * n
    examples = LogExamples(rows, y, np.arange(n, dtype=np.float64), None, delay)
    cfg = RankerConfig(model="logreg", device="cpu", loss="dfm",
                       encoder=EncoderConfig(num_buckets=256))  # fmt: skip
    pretrain(examples, tmp_path / "p.pt", config=cfg, progress=False)
    r = TorchRanker.load(tmp_path / "p.pt")
    mean_delay = 1.0 / float(r.predict_delay_rate_many(rows[:1])[0])
    assert abs(mean_delay - float(np.nanmean(delay))) < 0.1 * 40.0  # the head starts at 300 s
    assert abs(float(r.predict_proba_many(rows[:1])[0]) - y.mean()) < 0.03
