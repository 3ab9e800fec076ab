"""The ``streamrec`` command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stream.cli_logs import LOG_COMMANDS
from stream.settings import ROLES, load_settings

if TYPE_CHECKING:
    pass


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
    through :func:`monitoring.redact.redact` before it is printed; settings that cannot be
    loaded (:class:`stream.settings.SettingsError`) are such an error, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from monitoring.redact import redact
        from stream.settings import SettingsError

        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            exc.message = redact(exc.message)
            raise
        except SettingsError as exc:  # a bad --config file or STREAMREC_* variable
            raise click.ClickException(redact(str(exc))) from None


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
    from logs.log_format import LogFormatError
    from stream.broker import BrokerNotFound, BrokerStartError
    from stream.demo import DemoError, run_demo

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
            config_path=config,
        )
    except (BrokerNotFound, BrokerStartError, LogFormatError, ValueError, DemoError) as exc:
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
@click.option(
    "--nice",
    default=None,
    type=click.IntRange(0, 19),
    help="Lower this worker's CPU priority by N (os.nice) at start, e.g. a trainer that "
    "shares its cores with serve replicas [default: the settings' nice, 0].",
)
@click.pass_context
def worker(
    ctx: click.Context, broker: str | None, config: str | None, metrics_port: int | None,
    metrics_host: str | None, data_dir: str | None, warm_start: str | None,
    checkpoint_dir: str | None, web_port: int | None, web_host: str | None, role: str | None,
    model_store: str | None, nice: int | None,
) -> None:  # fmt: skip
    """Run a worker: joiner, trainer, calibration monitor, indexer (or one side: --role)."""
    import dataclasses

    from stream.worker import run_worker

    settings = load_settings(
        config, broker=broker, metrics_port=metrics_port, metrics_host=metrics_host,
        data_dir=data_dir, web_port=web_port, web_host=web_host, role=role,
        model_store=model_store, nice=nice,
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
    from logs.io import read_log_frame
    from logs.log_format import LogFormatError
    from stream.app import create_worker_topics
    from stream.replay import check_replayable, replay

    settings = load_settings(config, broker=broker, partitions=partitions)
    if speedup is not None and speedup <= 0:
        raise click.BadParameter("must be > 0", param_hint="--speedup")
    gap = settings.final_watermark_gap_s
    try:
        # a log the workers would refuse fails here, before the broker is touched
        frame = read_log_frame(log_path)
        if limit is not None:
            frame = frame.iloc[:limit].reset_index(drop=True)
        check_replayable(
            frame, log_path, final_watermark_gap_s=gap,
            max_future_skew_s=settings.max_future_skew_s,
        )  # fmt: skip
        if create_topics:
            create_worker_topics(settings)
        stats = replay(
            log_path, settings.bootstrap, speedup=speedup,
            watermark_every=settings.replay_watermark_every, final_watermark_gap_s=gap,
            fmt=fmt, client_options=settings.kafka_client_options(),
            max_future_skew_s=settings.max_future_skew_s, frame=frame,
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
    except (FileNotFoundError, ValueError) as exc:  # missing or unreadable run files
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
@click.option(
    "--trainer-nice",
    default=10,
    show_default=True,
    type=click.IntRange(0, 19),
    help="Role topology with --serve replicas: the trainer's CPU niceness, so that the "
    "replicas sharing its cores get the CPU first (0: equal priority).",
)
def stack_up(
    workers: int, run_dir: str, broker_port: int, metrics_base_port: int,
    prometheus: bool | None, prometheus_port: int, config: str | None, timeout: float,
    joiners: int, serve: int, web_base_port: int, trainer_nice: int,
) -> None:  # fmt: skip
    """Start the broker, the topics, N workers (or joiners, a trainer and serve replicas)
    and Prometheus as detached processes."""
    from stream.broker import BrokerNotFound, BrokerStartError
    from stream.stack import StackConfig, StackError, up

    cfg = StackConfig(
        run_dir=Path(run_dir), workers=workers, broker_port=broker_port,
        metrics_base_port=metrics_base_port, prometheus=prometheus,
        prometheus_port=prometheus_port, config=config, timeout_s=timeout,
        joiners=joiners, serve=serve, web_base_port=web_base_port, trainer_nice=trainer_nice,
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


for _command in LOG_COMMANDS:  # generate, convert-*, pretrain, evaluate, evaluate-retrieval
    main.add_command(_command)


if __name__ == "__main__":
    sys.exit(main())
