"""`mmsent reconcile`: did every input record end as an event or a dead letter? The oracle of the fault tests.

It reads the input, output and dead-letter topics and reports, per input partition, how many records ended as an
event, a dead letter, both, or neither (lost), and how many outputs were repeats. Records the log has deleted (below
the partition's start offset) that have no output are "lost to retention": they were never scored, and are counted
in their own column, not skipped. Exit status 1 when any record still in the log is lost; else 3 when records were
lost to retention; else 0.

The log keeps no trace of what it deleted, so "lost to retention" counts the offsets below the start that no output
names: an upper bound where the deleted part held transaction markers or compacted-away offsets.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import typer

from consumer.kafkaconfig import client_config as kafka_client_config
from consumer.replay import ReplayWindow, parse_rfc3339, plan_window
from consumer.settings import Settings
from tooling.topicreader import Record, read_topic, watermarks

EXIT_LOST = 1
EXIT_LOST_TO_RETENTION = 3


@dataclass
class PartitionReport:
    partition: int
    inputs: int = 0
    events: int = 0
    dead_letters: int = 0
    both: int = 0
    lost: int = 0
    repeats: int = 0
    lost_to_retention: int = 0  # offsets below the log start that no output names: deleted before they were scored
    lost_offsets: list[int] = field(default_factory=list)


@dataclass
class Report:
    input_topic: str
    partitions: list[PartitionReport]
    unknown_outputs: int = 0  # outputs whose source is not an input record in range (another topic, a bad value)

    def total(self, name: str) -> int:
        return sum(int(getattr(p, name)) for p in self.partitions)

    @property
    def ok(self) -> bool:
        return self.total("lost") == 0 and self.total("lost_to_retention") == 0

    @property
    def exit_code(self) -> int:
        if self.total("lost"):
            return EXIT_LOST
        return EXIT_LOST_TO_RETENTION if self.total("lost_to_retention") else 0

    def as_dict(self) -> dict[str, Any]:
        totals = {name: self.total(name) for name in ("inputs", "events", "dead_letters", "both", "lost", "repeats")}
        return {
            "input_topic": self.input_topic,
            "ok": self.ok,
            "totals": totals,
            "lost_to_retention": self.total("lost_to_retention"),
            "unknown_outputs": self.unknown_outputs,
            "partitions": [asdict(p) for p in self.partitions],
        }


def _sources(records: list[Record], input_topic: str) -> tuple[Counter[tuple[int, int]], int]:
    """(partition, offset) -> how many outputs name it as their source; plus the count that name no input."""
    seen: Counter[tuple[int, int]] = Counter()
    unknown = 0
    for record in records:
        try:
            source = json.loads(record.value or b"")["source"]
            if source["topic"] != input_topic:
                unknown += 1
                continue
            seen[(int(source["partition"]), int(source["offset"]))] += 1
        except (ValueError, KeyError, TypeError):
            unknown += 1
    return seen, unknown


def reconcile(
    client_config: dict[str, Any],
    input_topic: str,
    output_topic: str,
    dlq_topic: str,
    *,
    isolation_level: str = "read_uncommitted",
    timeout_s: float = 120.0,
    window: ReplayWindow | None = None,
) -> Report:
    """`window`: only the inputs that a replay of it scores (`consumer/replay.py`) are expected to have an output
    (and what the log deleted before the window is not counted)."""
    starts = {p: low for p, (low, _end) in watermarks(client_config, input_topic).items()}
    inputs = read_topic(client_config, input_topic, timeout_s=timeout_s)
    if window is not None:
        inputs = [r for r in inputs if not window.past_end(r.partition, r.offset)
                  and r.offset >= window.starts.get(r.partition, 0) and window.decision(r.timestamp_ms) is None]
    events, unknown_events = _sources(
        read_topic(client_config, output_topic, timeout_s=timeout_s, isolation_level=isolation_level), input_topic
    )
    dead, unknown_dead = _sources(
        read_topic(client_config, dlq_topic, timeout_s=timeout_s, isolation_level=isolation_level), input_topic
    )
    by_partition: dict[int, PartitionReport] = defaultdict(lambda: PartitionReport(partition=-1))
    if window is None:
        for partition, start in starts.items():
            scored = {offset for p, offset in events + dead if p == partition and offset < start}
            by_partition[partition] = PartitionReport(partition, lost_to_retention=start - len(scored))
    input_keys = set()
    for record in inputs:
        key = (record.partition, record.offset)
        input_keys.add(key)
        report = by_partition[record.partition]
        report.partition = record.partition
        report.inputs += 1
        n_events, n_dead = events.get(key, 0), dead.get(key, 0)
        report.events += n_events > 0
        report.dead_letters += n_dead > 0
        report.both += n_events > 0 and n_dead > 0
        report.repeats += max(0, n_events + n_dead - 1)
        if n_events + n_dead == 0:
            report.lost += 1
            if len(report.lost_offsets) < 20:
                report.lost_offsets.append(record.offset)
    unknown = unknown_events + unknown_dead
    # an output whose source the log has deleted since is no mystery: it was scored before the deletion
    unknown += sum(n for key, n in (events + dead).items()
                   if key not in input_keys and key[1] >= starts.get(key[0], 0))
    return Report(input_topic, sorted(by_partition.values(), key=lambda p: p.partition), unknown)


def render_table(report: Report) -> str:
    header = (f"{'partition':>9} {'inputs':>8} {'events':>8} {'dead':>6} {'both':>5} {'lost':>6} {'repeats':>8} "
              f"{'lost to retention':>17}")
    lines = [f"reconcile {report.input_topic}", header]
    for p in report.partitions:
        lines.append(
            f"{p.partition:>9} {p.inputs:>8} {p.events:>8} {p.dead_letters:>6} {p.both:>5} {p.lost:>6} {p.repeats:>8} "
            f"{p.lost_to_retention:>17}" + (f"  lost offsets: {p.lost_offsets}" if p.lost_offsets else "")
        )
    totals = report.as_dict()["totals"]
    retention = report.total("lost_to_retention")
    lines.append(
        f"{'total':>9} {totals['inputs']:>8} {totals['events']:>8} {totals['dead_letters']:>6} {totals['both']:>5} "
        f"{totals['lost']:>6} {totals['repeats']:>8} {retention:>17}"
    )
    lines.append(f"unknown outputs: {report.unknown_outputs}")
    if totals["lost"]:
        lines.append(f"LOST: {totals['lost']} input records have no output")
    if retention:
        lines.append(f"LOST TO RETENTION: {retention} input records were deleted by the log before they were scored")
    if report.ok:
        lines.append("OK: nothing lost")
    return "\n".join(lines)


def reconcile_command(
    bootstrap: Annotated[str | None, typer.Option(help="Brokers; default MMSENT_KAFKA_BOOTSTRAP_SERVERS.")] = None,
    input_topic: Annotated[str | None, typer.Option("--input", help="Default MMSENT_INPUT_TOPIC.")] = None,
    output_topic: Annotated[str | None, typer.Option("--output", help="Default MMSENT_OUTPUT_TOPIC.")] = None,
    dlq_topic: Annotated[str | None, typer.Option("--dlq", help="Default MMSENT_DLQ_TOPIC.")] = None,
    read_committed: Annotated[bool, typer.Option(help="Read outputs as a read_committed consumer would.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    start: Annotated[str | None, typer.Option("--from", help="A replay's window: its --from (RFC 3339).")] = None,
    end: Annotated[str | None, typer.Option("--to", help="A replay's window: its --to (RFC 3339).")] = None,
) -> None:
    """Check that every input record ended as an event or a dead letter; exit 1 when any is lost, 3 when records
    were deleted by the log's retention before they were scored. With --from (and --to), only the records a
    `mmsent replay` of that window scores."""
    settings = Settings()
    client_config = kafka_client_config(settings)
    if bootstrap:
        client_config["bootstrap.servers"] = bootstrap
    window = None if start is None else plan_window(
        client_config, input_topic or settings.input_topic, parse_rfc3339(start),
        None if end is None else parse_rfc3339(end), progress=False)
    report = reconcile(
        client_config,
        input_topic or settings.input_topic,
        output_topic or settings.output_topic,
        dlq_topic or settings.dlq_topic,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        window=window,
    )
    typer.echo(json.dumps(report.as_dict()) if as_json else render_table(report))
    raise typer.Exit(report.exit_code)
