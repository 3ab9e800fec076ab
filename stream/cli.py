"""The ``streamrec`` command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from stream.settings import load_settings


def _broker_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError

    return (KafkaError, ConnectionError)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group()
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
@click.option("--seed", default=0, show_default=True)
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the end.")
def demo(
    run_dir: str, log_path: str | None, impressions: int, seed: int, config: str | None,
    timeout: float,
) -> None:  # fmt: skip
    """Embedded broker + worker + replay of a synthetic log with a drift; prints a summary."""
    from stream.broker import BrokerNotFound, BrokerStartError
    from stream.demo import run_demo
    from stream.logs import LogFormatError

    try:
        run_demo(
            run_dir,
            log_path=log_path,
            n_impressions=impressions,
            seed=seed,
            settings=load_settings(config),
            timeout_s=timeout,
        )
    except (BrokerNotFound, BrokerStartError, LogFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--broker", default=None, help="Kafka bootstrap host:port (env STREAMREC_BROKER).")
@click.option("--config", default=None, type=click.Path(exists=True), help="Settings TOML.")
@click.option("--metrics-port", default=None, type=int, help="Port of /metrics (0 = any).")
@click.option("--metrics-host", default=None, help="Address /metrics binds to.")
@click.option("--data-dir", default=None, type=click.Path())
@click.pass_context
def worker(
    ctx: click.Context, broker: str | None, config: str | None, metrics_port: int | None,
    metrics_host: str | None, data_dir: str | None,
) -> None:  # fmt: skip
    """Run a worker: joiner, trainer, calibration monitor, indexer."""
    from stream.worker import run_worker

    settings = load_settings(
        config, broker=broker, metrics_port=metrics_port, metrics_host=metrics_host,
        data_dir=data_dir,
    )  # fmt: skip
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
def replay_cmd(
    log_path: str, broker: str, speedup: float | None, limit: int | None, create_topics: bool,
    partitions: int, config: str | None,
) -> None:  # fmt: skip
    """Publish a canonical log (CSV, CSV.gz, JSONL, Parquet) in event-time order."""
    from stream import broker as broker_mod
    from stream.app import topic_plan
    from stream.logs import LogFormatError
    from stream.replay import replay

    settings = load_settings(config, broker=broker, partitions=partitions)
    if speedup is not None and speedup <= 0:
        raise click.BadParameter("must be > 0", param_hint="--speedup")
    try:
        if create_topics:
            broker_mod.create_topics(settings.bootstrap, topic_plan(settings))
        stats = replay(
            log_path, settings.bootstrap, speedup=speedup, limit=limit,
            watermark_every=settings.replay_watermark_every,
            final_watermark_gap_s=settings.join.window_s + settings.join.lateness_s + 1,
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
def generate(
    out: str, impressions: int, seed: int, drift_at: float, drift_multiplier: float
) -> None:
    """Write a synthetic log with known true click probabilities (and a .meta.json)."""
    from stream.synthetic import SyntheticConfig, write_synthetic

    try:
        cfg = SyntheticConfig(
            n_impressions=impressions, seed=seed,
            drift_at=None if drift_at < 0 else drift_at, drift_multiplier=drift_multiplier,
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
    from stream.logs import convert_obd

    if item_context is None:
        guess = Path(src).parent / "item_context.csv"
        item_context = str(guess) if guess.exists() else None
    n = convert_obd(src, dst, item_context=item_context, click_delay_s=click_delay)
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


if __name__ == "__main__":
    sys.exit(main())
