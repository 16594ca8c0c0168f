"""The `mmsent` console script: one entry point for the service, the model and the tooling.

The one place that mounts the other packages' commands: the model's (`mmsent.cli`: train, eval) and, where the
tooling is installed (a checkout; not the container image), `tooling.cli` (demo, bench, reconcile). Heavy imports
(torch, confluent-kafka) happen inside each command, so `mmsent schema` or `--help` is instant.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="mmsent",
    help="Streaming multimodal sentiment for moderation: Kafka in, sentiment events out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.command()
def consume() -> None:
    """Run the consumer with the MMSENT_* settings until SIGTERM/SIGINT, then drain, commit and exit 0."""
    from consumer.app import run_consumer
    from consumer.logging import configure_logging
    from consumer.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)
    raise typer.Exit(run_consumer(settings))


@app.command()
def replay(
    start: Annotated[str, typer.Option("--from", help="RFC 3339: the first record timestamp replayed")],
    output_topic: Annotated[str, typer.Option(help="where the window's events go")],
    end: Annotated[str | None, typer.Option("--to", help="RFC 3339, excluded (default: the end as it is now)")] = None,
    model: Annotated[str | None, typer.Option(help="a model directory or preset (default: MMSENT_MODEL)")] = None,
    dlq_topic: Annotated[str | None, typer.Option(help="the window's dead letters (default: OUTPUT_TOPIC.dlq)")] = None,
    group: Annotated[str | None, typer.Option(help="consumer group (default: GROUP-replay-OUTPUT_TOPIC; a rerun "
                                                   "of the same replay resumes)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Re-score the input posts whose record timestamps fall in [--from, --to) into --output-topic, under a consumer
    group of its own, with the MMSENT_* settings otherwise; exit 0 once the window is done. Alerts are off."""
    from consumer.app import run_consumer
    from consumer.kafkaconfig import client_config
    from consumer.logging import configure_logging
    from consumer.replay import parse_rfc3339, plan_window
    from consumer.settings import Settings

    base = Settings()
    settings = base.model_copy(update={
        "output_topic": output_topic, "dlq_topic": dlq_topic or f"{output_topic}.dlq", "alert_topic": None,
        "group_id": group or f"{base.group_id}-replay-{output_topic}", "group_instance_id": None,
        "transactional_id": None, "model": model or base.model, "model_watch_s": 0.0,
    })
    configure_logging(settings.log_level, json_logs=settings.log_json)
    try:
        window_from, window_to = parse_rfc3339(start), None if end is None else parse_rfc3339(end)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        window = plan_window(client_config(settings), settings.input_topic, window_from, window_to,
                             group=settings.group_id, progress=not quiet)
    except LookupError as exc:  # no such topic, or a broker that cannot find records by time
        typer.echo(f"replay: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"replay: {window.size} records of {settings.input_topic} -> {output_topic} "
               f"(group {settings.group_id})", err=True)
    raise typer.Exit(run_consumer(settings, window) if window.size else 0)


@app.command()
def inspect(
    host: Annotated[str | None, typer.Option(help="the address to bind (default: MMSENT_INSPECT_HOST, 127.0.0.1)")]
    = None,
    port: Annotated[int | None, typer.Option(help="the port (default: MMSENT_INSPECT_PORT, 8765; 0: a free one)")]
    = None,
) -> None:
    """The live console: a web page of the scored stream (each event with its post's caption and thumbnail, alerts
    and their reasons, dead letters, charts), with the consumer's MMSENT_* settings; it never writes to a topic.
    Binding anything but loopback needs MMSENT_INSPECT_TOKEN."""
    import signal

    from consumer.inspect import Inspector, UnsafeBind
    from consumer.logging import configure_logging
    from consumer.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)
    try:
        inspector = Inspector(settings, host=host, port=port)  # refuses an unsafe bind before any thread starts
    except UnsafeBind as exc:
        typer.echo(f"inspect: {exc}", err=True)
        raise typer.Exit(2) from None
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before its threads start: they inherit the mask
    with inspector:
        typer.echo(f"mmsent inspect: {inspector.url}", err=True)
        signal.sigwait(stop_signals)  # the console runs on its own threads until then


@app.command()
def schema(
    write: Annotated[
        Path | None, typer.Option(help="Write one <name>.json per message into this directory instead of printing.")
    ] = None,
) -> None:
    """Print the JSON Schemas of the wire messages (post, sentiment_event, dead_letter)."""
    from schemas.export import json_schemas, write_schemas

    if write is not None:
        for path in write_schemas(write):
            typer.echo(f"wrote {path}")
        return
    typer.echo(json.dumps(json_schemas(), indent=2, sort_keys=True))


def _mount_optional(module_name: str, attribute: str = "app") -> None:
    """Add the commands of another package's typer app, when that package is installed."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise  # the package is there, but something it imports is not: that is a fault, not an absence
        return
    sub_app = getattr(module, attribute)
    app.registered_commands.extend(sub_app.registered_commands)
    app.registered_groups.extend(sub_app.registered_groups)


for _module in ("mmsent.cli", "tooling.cli"):
    _mount_optional(_module)


def main() -> None:
    app(prog_name="mmsent")


if __name__ == "__main__":
    main()
