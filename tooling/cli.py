"""The tooling's commands, mounted into the `mmsent` console script by `consumer/cli.py`."""

from __future__ import annotations

import importlib.util
from typing import Annotated

import typer

from tooling.bench import bench_app
from tooling.reconcile import reconcile_command

app = typer.Typer()
app.add_typer(bench_app, name="bench")
app.command(name="reconcile")(reconcile_command)

# What the `tools` extra brings; without it these commands say so instead of failing on an import deep inside.
TOOLS_EXTRA = {"noida_db": "noida-db", "psutil": "psutil"}


def require_tools_extra(command: str) -> None:
    missing = [package for module, package in TOOLS_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        typer.echo(f"`mmsent {command}` needs {', '.join(missing)}: pip install 'mmsent[tools]'", err=True)
        raise typer.Exit(2)


@bench_app.callback()
def bench() -> None:
    """Benchmarks: model only, end to end, and the naive consumer, side by side."""
    require_tools_extra("bench")


@app.command()
def demo(
    posts: Annotated[int, typer.Option(help="How many synthetic posts to stream.")] = 300,
    linger: Annotated[float, typer.Option(help="Seconds the console (mmsent inspect) stays open after the summary.")]
    = 0.0,
) -> None:
    """The embedded default: broker, Redis, image server, consumer and model on this machine, the live console
    beside them (its URL printed), then a summary."""
    require_tools_extra("demo")
    from tooling.demo import run_demo  # the consumer and its model (torch), and the tools extra checked just above

    raise typer.Exit(run_demo(posts=posts, linger_s=linger))
