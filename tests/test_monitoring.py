"""The monitoring proven against what runs: the dashboard against a running consumer's metrics, the alert rules
through Prometheus's own `promtool` (checked, and one unit test file per alert in k8s/monitoring/tests/), and a
real Prometheus on loopback that scrapes a running consumer.

One consumer (a thread: tiny-random, the real broker, a real Redis, images from a loopback server) serves the
module: it scores a few posts and keeps running while the tests scrape it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import Application
from tests.consumerutil import (
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.imageserver import ImageServer, image, sample_image
from tests.kafkautil import create_topics, produce
from tooling.embedded import free_port

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "k8s" / "monitoring"
# Metric families that are in no panel, each with its reason. Empty: every family has a panel.
NOT_ON_THE_DASHBOARD: dict[str, str] = {}
# Sample suffixes a family's series carry (counters' _total, histograms' buckets, sums and counts)
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
METRIC_NAME = re.compile(r"\bmmsent_[a-z0-9_]+\b")


@pytest.fixture(scope="module")
def running_consumer(kafka_bootstrap: str, redis_url: str) -> Iterator[Application]:
    topics = Topics.named(f"mon{time.monotonic_ns() % 10**9}")
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 1, topics.dlq: 1})
    with ImageServer() as images:
        url = images.route("/cat.jpg", image(sample_image()))
        settings = make_settings(settings_env(kafka_bootstrap, topics, redis_url))
        with app_in_thread(settings, serve_http=True) as app:
            assert wait_until(lambda: app.ready, 90)
            produce(kafka_bootstrap, topics.posts, synthetic_posts(30, lambda i: url if i % 2 else None))
            produce(kafka_bootstrap, topics.posts, [b"not json"])  # a dead letter: its families appear too
            assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 90)
            # the statistics callback (every 5 s) sets the lag gauges
            assert wait_until(lambda: "mmsent_lag_seconds" in scrape(app), 20)
            yield app


def scrape(app: Application) -> dict[str, Any]:
    assert app.health is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{app.health.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text) if family.name.startswith("mmsent")}


def family_of(sample_name: str, families: set[str]) -> str | None:
    """The family a series name belongs to (`mmsent_x_total` -> `mmsent_x`), if any."""
    for name in (sample_name, *(sample_name.removesuffix(s) for s in SUFFIXES if sample_name.endswith(s))):
        if name in families:
            return name
    return None


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_every_metric_family_is_on_the_dashboard_and_every_panel_queries_one(running_consumer: Application) -> None:
    # some families have series only after their events (a reload, a shadow failure): the code defines them all
    defined = {m.name for m in REGISTRY.collect() if m.name.startswith("mmsent")}
    # prometheus_client exposes each counter's and histogram's creation time as a `<family>_created` gauge: the
    # same family, not one of its own
    scraped = {name for name in scrape(running_consumer)
               if not (name.endswith("_created") and name.removesuffix("_created") in defined)}
    families = scraped | defined
    exprs = dashboard_exprs()
    queried = {name for expr in exprs for name in METRIC_NAME.findall(expr)}

    unknown = sorted(name for name in queried if family_of(name, families) is None)
    covered = {family_of(name, families) for name in queried}
    missing = sorted(families - covered - set(NOT_ON_THE_DASHBOARD))
    print(f"\n{len(scraped)} families scraped, {len(defined)} defined, {len(families - scraped)} only defined "
          f"({sorted(families - scraped)}); {len(exprs)} panel queries over {len(covered)} families")
    assert not missing, f"metric families in no panel of the dashboard: {missing}"
    assert not unknown, f"panels query metrics that do not exist: {unknown}"
    assert "mmsent_records_consumed" in scraped and "mmsent_lag_seconds" in scraped


def test_alert_precision_panel_reads_the_feedback_counter() -> None:
    precision = [e for e in dashboard_exprs() if "mmsent_feedback_total" in e and 'predicted="negative"' in e]
    assert any("sum by (model)" in e and 'actual="negative"' in e and " / " in e for e in precision), precision


# -- the alert rules, by promtool ----------------------------------------------------------------------------------


def rules_file(directory: Path) -> Path:
    """The PrometheusRule's spec.groups as a plain rules file, where the unit tests expect it."""
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def alert_names() -> set[str]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run installs it)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(rules_file(tmp_path)))
    print(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_one_file_per_alert(tmp_path: Path) -> None:
    rules_file(tmp_path)
    group_order = [group["name"] for group in
                   yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]["groups"]]
    tests = sorted((MONITORING / "tests").glob("*.test.yaml"))
    tested: dict[str, list[str]] = {}
    for test in tests:
        shutil.copy(test, tmp_path / test.name)
        # without it promtool evaluates the groups in map order: an alert may read last minute's recording rule
        assert yaml.safe_load(test.read_text()).get("group_eval_order") == group_order, test.name
        names = {case["alertname"] for t in yaml.safe_load(test.read_text())["tests"]
                 for case in t.get("alert_rule_test", [])}
        assert len(names) == 1, f"{test.name} tests {sorted(names)}: one alert per file"
        tested.setdefault(names.pop(), []).append(test.name)
        # each file fires its alert on one series and lists exactly what fires: a silent series stays silent
        assert any(case.get("exp_alerts") for t in yaml.safe_load(test.read_text())["tests"]
                   for case in t["alert_rule_test"]), f"{test.name} never expects its alert to fire"
    assert set(tested) == alert_names(), f"alerts without a test file: {sorted(alert_names() - set(tested))}"
    assert all(len(files) == 1 for files in tested.values()), tested
    result = promtool("test", "rules", *(t.name for t in tests), cwd=tmp_path)
    print(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(tests)


# -- a real Prometheus scraping the consumer -----------------------------------------------------------------------


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def test_a_real_prometheus_scrapes_the_running_consumer(running_consumer: Application, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run installs it)")
    assert running_consumer.health is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "mmsent", "static_configs": [
            {"targets": [f"127.0.0.1:{running_consumer.health.port}"], "labels": {"namespace": "test"}}]}],
    }))
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def scraped() -> bool:
            try:
                return bool(prometheus_query(port, 'mmsent_records_consumed_total{job="mmsent"} > 0'))
            except OSError:
                return False  # not listening yet

        assert wait_until(scraped, 60, interval=0.5), (tmp_path / "prometheus.log").read_text()[-3000:]
        consumed = prometheus_query(port, 'sum(mmsent_records_consumed_total{job="mmsent"})')
        lag = prometheus_query(port, 'mmsent_lag_seconds{job="mmsent"}')
        up = prometheus_query(port, 'up{job="mmsent"}')
        print(f"\nPrometheus: consumed {consumed[0]['value'][1]}, lag series "
              f"{sorted((s['metric']['partition'], s['metric']['kind'], s['value'][1]) for s in lag)}")
        assert float(consumed[0]["value"][1]) >= 31
        assert {s["metric"]["kind"] for s in lag} == {"uncommitted", "unread"}
        assert up[0]["value"][1] == "1"
    finally:
        server.terminate()
        server.wait(30)
        log.close()
