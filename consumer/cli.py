"""The `mmsent` console script: one entry point for the service, the model and the tooling.

The one place that mounts the other packages' commands: the model's (`mmsent.cli`: train, eval, calibrate,
quantize) and, where the tooling is installed (a checkout; not the container image), `tooling.cli` (demo, bench,
reconcile).

    mmsent --help         the service's commands and the mounted ones' summaries (MOUNTED): nothing imported
    mmsent train ...      MountingGroup.resolve_command ──▶ import mmsent.cli ──▶ its `train` runs
    mmsent consume        consume() ──▶ import consumer.app (which loads mmsent, so torch) ──▶ run

So `mmsent --help` starts in a fraction of a second (BENCHMARKS.md): torch (seconds, and 1 GiB) loads only for a
command that needs the model, pydantic-settings and structlog (0.6 s) only for one that reads the settings. That is
why the commands below import what they run inside their bodies, and why the other packages' commands are mounted
by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import signal
import threading
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    # typer vendors click as typer._click and types TyperGroup's methods with its classes: the overrides below must
    # say the same (`click` installed beside it is another package, whose classes typer does not use)
    from typer._click import Command, Context


@dataclass(frozen=True)
class Mounted:
    """A command another package owns: the module whose typer `app` has it, and what `mmsent --help` says of it
    without importing that module (the first sentence of the command's help: tests/test_cli.py checks they agree,
    and that every command of those modules is here)."""

    name: str
    module: str
    summary: str


MOUNTED = {mounted.name: mounted for mounted in (
    Mounted("train", "mmsent.cli", "Train a model directory on a labelled file."),
    Mounted("eval", "mmsent.cli", "Evaluate a model on a labelled file: accuracy, macro/weighted F1, per-class P/R/F1, "
                                  "ECE (and the reliability diagram)."),
    Mounted("calibrate", "mmsent.cli", "Fit the model's calibration (a temperature on its logits, by NLL) and its "
                                       "per-label alert thresholds by target precision on a labelled file;"),
    Mounted("quantize", "mmsent.cli", "Make a model directory ready for int8 on the CPU: take the CNN's activation "
                                      "ranges on the data's photos (int8-ranges.json) and the text encoder's on its "
                                      "captions (int8-text-ranges.json), score the data in fp32 and in int8, and "
                                      "write what int8 kept (int8.json)."),
    Mounted("reconcile", "tooling.cli", "Check that every input record ended as an event or a dead letter;"),
    Mounted("demo", "tooling.cli", "The embedded default: broker, Redis, image server, consumer and model on this "
                                   "machine, the live console beside them (its URL printed), then a summary."),
    Mounted("bench", "tooling.cli", "Benchmarks (`mmsent bench all --write BENCHMARKS.md`)."),
)}


def installed(module: str) -> bool:
    """Whether the module's package is installed (the image has no `tooling`), without importing it."""
    return importlib.util.find_spec(module.partition(".")[0]) is not None


def load_mounted(mounted: Mounted) -> Command:
    """The real command: its module imported now (a module that is there but fails to import raises)."""
    command = typer.main.get_command(importlib.import_module(mounted.module).app)
    return command.commands[mounted.name] if isinstance(command, TyperGroup) else command


class MountingGroup(TyperGroup):
    """Lists the mounted commands by their summaries; imports a command's module only when that command is run (or
    asked for its own --help)."""

    def list_commands(self, ctx: Context) -> list[str]:
        mounted = [name for name, m in MOUNTED.items() if name not in self.commands and installed(m.module)]
        return [*super().list_commands(ctx), *mounted]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = super().get_command(ctx, cmd_name)
        mounted = MOUNTED.get(cmd_name)
        if command is None and mounted is not None and installed(mounted.module):
            return TyperCommand(cmd_name, help=mounted.summary)  # what a listing shows; never run
        return command

    def resolve_command(
        self, ctx: Context, args: list[str]
    ) -> tuple[str | None, Command | None, list[str]]:
        known = self.list_commands(ctx)
        if args and not args[0].startswith("-") and args[0] not in known:
            # typer suggests only from the commands it holds, which leaves out the mounted ones not yet loaded
            close = get_close_matches(args[0], known)
            hint = f" Did you mean {', '.join(repr(name) for name in close)}?" if close else ""
            ctx.fail(f"No such command {args[0]!r}.{hint}")
        name, command, rest = super().resolve_command(ctx, args)
        if name in MOUNTED and name not in self.commands:
            command = load_mounted(MOUNTED[name])
            self.add_command(command, name)
        return name, command, rest


app = typer.Typer(
    name="mmsent",
    cls=MountingGroup,
    help="Streaming multimodal sentiment for moderation: Kafka in, sentiment events out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.command()
def consume() -> None:
    """Run the consumer with the MMSENT_* settings until SIGTERM/SIGINT, then drain, commit and exit 0."""
    from consumer.app import run_consumer  # on call, not at import: the module docstring says why
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
    from consumer.app import run_consumer  # on call, not at import: the module docstring says why
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
    from consumer.inspect import Inspector, UnsafeBind  # on call, not at import: the module docstring says why
    from consumer.logging import configure_logging
    from consumer.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)
    try:
        inspector = Inspector(settings, host=host, port=port)  # refuses an unsafe bind before any thread starts
    except UnsafeBind as exc:
        typer.echo(f"inspect: {exc}", err=True)
        raise typer.Exit(2) from None
    stopping = threading.Event()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda _signum, _frame: stopping.set())
    with inspector:
        typer.echo(f"mmsent inspect: {inspector.url}", err=True)
        while not stopping.wait(1.0):  # the console runs on its own threads until a signal
            pass


@app.command()
def schema(
    write: Annotated[
        Path | None, typer.Option(help="Write one <name>.json per message into this directory instead of printing.")
    ] = None,
) -> None:
    """Print the JSON Schemas of the wire messages (post, sentiment_event, dead_letter)."""
    from schemas.export import json_schemas, write_schemas  # pydantic: on call, as the module docstring says

    if write is not None:
        for path in write_schemas(write):
            typer.echo(f"wrote {path}")
        return
    typer.echo(json.dumps(json_schemas(), indent=2, sort_keys=True))


def main() -> None:
    app(prog_name="mmsent")


if __name__ == "__main__":
    main()
