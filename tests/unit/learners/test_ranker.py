"""TorchRanker and RankerConfig specifics; the behaviour shared by every learner is in
``test_learner_checks.py``."""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from learners.encoding import EncoderConfig
from learners.losses import LOSSES
from learners.models import MMoE
from learners.ranker import MODELS, RankerConfig, TorchRanker

SMALL = EncoderConfig(num_buckets=256, max_cat_fields=4, max_num_fields=2)
ROWS: list[dict[str, object]] = [
    {"user_id": f"u{i % 7}", "item_id": f"i{i % 11}", "seg": f"s{i % 3}", "x": float(i)}
    for i in range(32)
]
Y = (np.arange(32) % 5 == 0).astype(np.float64)


def _mmoe(**kw: Any) -> TorchRanker:
    settings: dict[str, Any] = {
        "model": "mmoe",
        "fallback_mixture": False,  # the model's own scores, compared exactly
        "device": "cpu",
        "encoder": SMALL,
        "hidden": (8,),
        "embedding_dim": 4,
        "bias_prior_strength": None,  # the first step sees the initial logits
    }
    return TorchRanker(RankerConfig(**{**settings, **kw}), seed=3, online=False)


def test_unknown_model_is_rejected_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'xgb'") as err:
        RankerConfig(model="xgb")
    assert all(name in str(err.value) for name in MODELS)
    assert set(MODELS) == {"logreg", "wide_deep", "deepfm", "dcnv2", "mmoe", "ple"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pos_weight", 0.0),
        ("pos_weight", float("inf")),
        ("pair_alpha", -0.1),
        ("pair_alpha", 1.5),
        ("num_experts", 0),
        ("num_tasks", 0),
        ("loss", "hinge"),
    ],
)
def test_invalid_new_settings_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RankerConfig(**{field: value})  # type: ignore[arg-type]  # deliberately invalid


def test_mmoe_without_hidden_layers_is_rejected() -> None:
    with pytest.raises(ValueError, match="hidden"):
        RankerConfig(model="mmoe", hidden=())
    with pytest.raises(ValueError, match="hidden"):
        RankerConfig(model="ple", hidden=())
    with pytest.raises(ValueError, match="task_experts"):
        RankerConfig(model="ple", task_experts=0)
    with pytest.raises(ValueError, match="ple_levels"):
        RankerConfig(model="ple", ple_levels=0)


def test_config_round_trips_new_fields_through_plain_containers() -> None:
    cfg = RankerConfig(
        model="mmoe",
        loss="combined_pair",
        pos_weight=3.0,
        pair_alpha=0.2,
        num_experts=2,
        num_tasks=3,
        hidden=(8,),
        encoder=SMALL,
    )
    d = cfg.to_dict()
    assert d["pos_weight"] == 3.0 and d["pair_alpha"] == 0.2
    assert d["num_experts"] == 2 and d["num_tasks"] == 3
    assert RankerConfig.from_dict(d) == cfg


def test_config_dict_from_before_the_new_fields_loads_with_defaults() -> None:
    d = RankerConfig(encoder=SMALL).to_dict()
    for key in ("pos_weight", "pair_alpha", "num_experts", "num_tasks"):
        del d[key]
    assert RankerConfig.from_dict(d) == RankerConfig(encoder=SMALL)


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_of_each_model_loads_with_weights_only(model: str, tmp_path: Path) -> None:
    cfg = RankerConfig(model=model, device="cpu", encoder=SMALL, hidden=(8,), embedding_dim=4)
    ranker = TorchRanker(cfg, seed=1)
    ranker.learn_many(ROWS, Y)
    ranker.save(tmp_path / "m.ckpt")
    torch.load(tmp_path / "m.ckpt", weights_only=True)  # plain containers only
    loaded = TorchRanker.load(tmp_path / "m.ckpt", device="cpu", online=False)
    assert loaded.config == cfg and not loaded.online
    np.testing.assert_array_equal(loaded.predict_proba_many(ROWS), ranker.predict_proba_many(ROWS))


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    """Truncated, foreign or code-carrying files: a ValueError naming the file, not torch's
    advice to retry with weights_only=False; a missing file stays FileNotFoundError."""
    ranker = TorchRanker(RankerConfig(model="logreg", device="cpu", encoder=SMALL), seed=1)
    ranker.save(tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_bytes(b"not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    (tmp_path / "code.ckpt").write_bytes(pickle.dumps(Path("x"), protocol=2))  # a class to import
    for name in ("truncated", "text", "list", "code"):
        with pytest.raises(ValueError, match=f"{name}.ckpt is not a .*streamrec checkpoint"):
            TorchRanker.load(tmp_path / f"{name}.ckpt")
    with pytest.raises(FileNotFoundError):
        TorchRanker.load(tmp_path / "missing.ckpt")
    TorchRanker.load(tmp_path / "good.ckpt")


@pytest.mark.parametrize(
    ("loss", "param", "kwarg", "value"),
    [
        ("weighted_bce", "pos_weight", "pos_weight", 4.0),
        ("combined_pair", "pair_alpha", "alpha", 0.25),
        ("focal", "focal_gamma", "gamma", 1.0),
    ],
)
def test_loss_parameters_come_from_the_config(
    loss: str, param: str, kwarg: str, value: float
) -> None:
    settings: dict[str, Any] = {param: value}
    cfg = RankerConfig(
        model="logreg",
        device="cpu",
        encoder=SMALL,
        loss=loss,
        bias_prior_strength=None,  # the first step sees the initial logits
        **settings,
    )
    ranker = TorchRanker(cfg, seed=0, online=False)
    ranker.learn_many(ROWS, Y)
    # The first step's training loss is the registry loss with the config's parameter.
    logits = torch.from_numpy(ranker.clone().predict_logit_many(ROWS))
    expected = LOSSES[loss](logits, torch.from_numpy(Y), **{kwarg: value})
    assert ranker.last_loss == pytest.approx(float(expected), rel=1e-5)


def _task_params(ranker: TorchRanker, task: int) -> list[torch.Tensor]:
    assert isinstance(ranker.model, MMoE)
    return [p.detach().clone() for p in ranker.model.towers[task].parameters()]


def test_mmoe_trains_task_one_only_from_finite_y2() -> None:
    no_y2, nan_y2, with_y2 = _mmoe(), _mmoe(), _mmoe()
    before = _task_params(no_y2, 1)
    no_y2.learn_many(ROWS, Y)
    nan_y2.learn_many(ROWS, Y, y2=np.full(32, np.nan))
    y2 = np.where(np.arange(32) % 2 == 0, Y, np.nan)  # half the rows have a second label
    with_y2.learn_many(ROWS, Y, y2=y2)
    for b, a in zip(before, _task_params(no_y2, 1), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # All-unknown y2 is the same as no y2.
    np.testing.assert_array_equal(nan_y2.predict_proba_many(ROWS), no_y2.predict_proba_many(ROWS))
    assert any(not torch.equal(a, b) for a, b in zip(before, _task_params(with_y2, 1), strict=True))
    assert with_y2.n_updates == 1 and with_y2.n_skipped_nonfinite == 0


def test_mmoe_multitask_loss_is_click_loss_plus_task_one_bce_on_known_rows() -> None:
    ranker = _mmoe()
    fresh = ranker.clone()
    y2 = np.where(np.arange(32) < 10, 1.0 - Y, np.nan)
    p = ranker.score_and_learn(ROWS, Y, y2=y2)
    with torch.no_grad():
        assert isinstance(fresh.model, MMoE)
        batch = fresh.encoder.encode(ROWS)
        tasks = fresh.model.forward_tasks(torch.from_numpy(batch.cat), torch.from_numpy(batch.num))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    t, t2 = torch.tensor(Y, dtype=torch.float32), torch.tensor(y2[:10], dtype=torch.float32)
    expected = bce(tasks[:, 0], t) + bce(tasks[:10, 1], t2)
    assert ranker.last_loss == pytest.approx(float(expected), rel=1e-6)
    np.testing.assert_allclose(p, torch.sigmoid(tasks[:, 0]).numpy(), rtol=0, atol=1e-7)


def test_y2_of_the_wrong_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="y2"):
        _mmoe().learn_many(ROWS, Y, y2=np.zeros(3))


def test_single_task_models_ignore_y2() -> None:
    cfg = RankerConfig(model="dcnv2", device="cpu", encoder=SMALL, hidden=(8,), embedding_dim=4)
    a, b = TorchRanker(cfg, seed=0), TorchRanker(cfg, seed=0)
    a.learn_many(ROWS, Y, y2=np.ones(32))
    b.learn_many(ROWS, Y)
    np.testing.assert_array_equal(a.predict_proba_many(ROWS), b.predict_proba_many(ROWS))


def test_replace_keeps_validation() -> None:
    with pytest.raises(ValueError, match="pair_alpha"):
        dataclasses.replace(RankerConfig(), pair_alpha=2.0)


def test_esmm_loss_is_click_loss_plus_ctcvr_bce_of_the_product() -> None:
    ranker = _mmoe(task1="esmm")
    fresh = ranker.clone()
    y2 = np.where(np.arange(32) < 20, Y * (np.arange(32) % 3 == 0), np.nan)  # clicked & conv
    ranker.learn_many(ROWS, Y, y2=y2)
    with torch.no_grad():
        assert isinstance(fresh.model, MMoE)
        batch = fresh.encoder.encode(ROWS)
        tasks = fresh.model.forward_tasks(torch.from_numpy(batch.cat), torch.from_numpy(batch.num))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ctcvr = torch.sigmoid(tasks[:20, 0]) * torch.sigmoid(tasks[:20, 1])
    t, t2 = torch.tensor(Y, dtype=torch.float32), torch.tensor(y2[:20], dtype=torch.float32)
    expected = bce(tasks[:, 0], t) + torch.nn.functional.binary_cross_entropy(ctcvr, t2)
    assert ranker.last_loss == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("task1", ["direct", "esmm"])
def test_predict_tasks_many_gives_each_tasks_probability(task1: str) -> None:
    ranker = _mmoe(task1=task1)
    ranker.learn_many(ROWS, Y, y2=Y * (np.arange(32) % 2))
    out = ranker.predict_tasks_many(ROWS)
    logits = ranker.predict_logit_many(ROWS)
    np.testing.assert_allclose(out["ctr"], 1 / (1 + np.exp(-logits)), rtol=1e-6)
    assert out["task1"].shape == (32,) and ((out["task1"] > 0) & (out["task1"] < 1)).all()
    if task1 == "esmm":
        np.testing.assert_allclose(out["task1"], out["ctr"] * out["cvr"], rtol=1e-12)
        assert (out["task1"] < out["ctr"]).all()  # pCTCVR never above pCTR
    else:
        assert "cvr" not in out
    assert all(v.shape == (0,) for v in ranker.predict_tasks_many([]).values())


def test_direct_task_one_warms_up_like_the_click_then_stops(tmp_path: Path) -> None:
    # task 0 and a direct task 1 are shifted on every step until bias_warmup rows; a twin
    # without the warm-up (bias_warmup 0: centred once) moves task 1's bias after its
    # first step by Adam's small steps alone, as the warmed one does once the warm-up is over
    warmup = 3 * 32
    y2 = Y * (np.arange(32) % 2)

    def bias_moves(ranker: TorchRanker) -> list[float]:
        moves = []
        for k in range(5):
            before = float(ranker.model.task_bias(1).detach()[0])
            ranker.learn_many(ROWS, Y, y2=y2)
            moves.append(abs(float(ranker.model.task_bias(1).detach()[0]) - before))
            # rows counted while warming up (the first step counts at least its own)
            assert ranker.task1_rows == min(32.0 * (k + 1), max(ranker.config.bias_warmup, 32))
        return moves

    ranker = _mmoe(task1="direct", bias_prior_strength=30.0, bias_warmup=float(warmup))
    warmed = bias_moves(ranker)
    once = bias_moves(_mmoe(task1="direct", bias_prior_strength=30.0, bias_warmup=0.0))
    assert warmed[0] == pytest.approx(once[0]) and warmed[0] > 0.5  # the first centring
    assert warmed[1] > 0.05 and max(once[1:]) < 0.01, (warmed, once)  # shifted again
    assert max(warmed[3:]) < 0.01, warmed  # the warm-up is over
    # online (a stream, whose second labels lag their impressions) it is centred once
    config = _mmoe(task1="direct", bias_prior_strength=30.0, bias_warmup=float(warmup)).config
    online = TorchRanker(config, seed=3, online=True)
    streamed = []
    for _ in range(3):
        before = float(online.model.task_bias(1).detach()[0])
        online.learn_many(ROWS, Y, y2=y2)
        streamed.append(abs(float(online.model.task_bias(1).detach()[0]) - before))
    assert streamed[0] > 0.3 and max(streamed[1:]) < 0.01, streamed
    ranker.save(tmp_path / "r.pt")
    assert TorchRanker.load(tmp_path / "r.pt").task1_rows == ranker.task1_rows
    # a checkpoint from before task 1's warm-up (its rows under "task1_rows", centred
    # once) does not start warming up when loaded
    state = _mmoe(task1="direct", bias_prior_strength=30.0).state()
    state["task1_centred"], state["task1_rows"] = True, 0.0
    del state["task1_warm_rows"]
    torch.save(state, tmp_path / "old.pt")
    assert TorchRanker.load(tmp_path / "old.pt").task1_rows == math.inf


@pytest.mark.parametrize("model", ["mmoe", "ple"])
def test_a_multitask_checkpoint_from_before_cross_layers_loads(model: str, tmp_path: Path) -> None:
    # written when the multi-task models ignored cross_layers (its config says 2, its
    # weights have none): loaded as it was built, scoring as before
    old = _mmoe(model=model, cross_layers=0)
    old.learn_many(ROWS, Y, y2=Y)
    state = old.state()
    state["config"]["cross_layers"] = 2
    torch.save(state, tmp_path / "old.pt")
    back = TorchRanker.load(tmp_path / "old.pt")
    assert isinstance(back.model, MMoE) and len(back.model.cross) == 0
    np.testing.assert_allclose(back.predict_proba_many(ROWS), old.predict_proba_many(ROWS))
    # a current one keeps its cross layers
    now = _mmoe(model=model, cross_layers=2)
    now.save(tmp_path / "now.pt")
    assert len(TorchRanker.load(tmp_path / "now.pt").model.cross) == 2


def test_predict_tasks_many_needs_a_second_task() -> None:
    cfg = RankerConfig(model="dcnv2", device="cpu", encoder=SMALL, hidden=(8,), embedding_dim=4)
    with pytest.raises(ValueError, match="mmoe"):
        TorchRanker(cfg, seed=0).predict_tasks_many(ROWS)
    with pytest.raises(ValueError, match="task1"):
        RankerConfig(model="mmoe", task1="cvr")


@pytest.mark.parametrize("task1", ["direct", "esmm"])
def test_task_one_starts_at_its_labels_rate(task1: str, tmp_path: Path) -> None:
    # a fresh tower starts at logit(prior_ctr): task 1 is re-centred on its first labels,
    # direct: on the y2 rate so far shrunk to the prior (again on every step of its
    # warm-up); ESMM: pCVR on conversions / clicks, once 30 clicks (bias_prior_strength)
    # have been seen
    ranker = _mmoe(task1=task1, bias_prior_strength=30.0)
    rows = ROWS * 32
    y = np.tile(Y, 32)
    y2 = y * (np.arange(len(y)) % 2)
    few = slice(0, 32)  # 7 clicks: ESMM waits for more
    ranker.learn_many(rows[few], y[few], y2=y2[few])
    assert ranker.task1_centred == (task1 == "direct")
    ranker.learn_many(rows, y, y2=y2)
    assert ranker.task1_centred
    if task1 == "esmm":
        key, target = "cvr", (y2[few].sum() + y2.sum()) / (y[few].sum() + y.sum())
    else:
        rows_seen = 32 + len(y)  # both batches: the warm-up (10,000 rows) is still on
        key = "task1"
        target = (y2[few].sum() + y2.sum() + 30.0 * ranker.config.prior_ctr) / (rows_seen + 30.0)
    # after the centring the Adam steps move the mean by little
    assert ranker.predict_tasks_many(rows)[key].mean() == pytest.approx(target, rel=0.15)
    untouched = _mmoe(task1=task1, bias_prior_strength=None)
    untouched.learn_many(rows, y, y2=y2)
    assert not untouched.task1_centred
    assert abs(untouched.predict_tasks_many(rows)[key].mean() - target) > 0.02
    ranker.save(tmp_path / "r.pt")
    back = TorchRanker.load(tmp_path / "r.pt")
    assert back.task1_centred and back.task1_warm == ranker.task1_warm
