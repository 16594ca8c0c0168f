"""Render a Kustomize directory: with `kubectl kustomize` where it exists, else with a small Python renderer.

The Python renderer implements only the subset that `k8s/` uses, and refuses anything else rather than
rendering it differently from Kustomize:

- `resources` (files and directories), `components` (kind `Component`), in Kustomize's order: resources,
  then components (each adds its resources and generators, then runs its transformers on everything so far),
  then this kustomization's generators, then its transformers;
- `configMapGenerator` with `files`/`literals` and `options.disableNameSuffixHash: true` (the name hash is
  not reproduced), `options.labels`/`annotations`;
- `namespace`; `labels` with `includeSelectors: false` and `includeTemplates: false` (metadata only);
- `images` (`newName`, `newTag`, `digest`) on pod-template containers;
- `patches` given as a file or inline without `target`: strategic merge for built-in kinds (merge keys for
  the lists the manifests patch), JSON merge patch (RFC 7386) for custom resources.

When kubectl is present, tests/test_deploy.py checks that this renderer and kubectl agree on every overlay.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

# Kinds whose objects have no namespace (the subset a workload's manifests could contain).
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "StorageClass",
        "PersistentVolume",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)

# Built-in API groups: strategic merge applies; anything else is a custom resource (JSON merge patch).
BUILTIN_GROUPS = frozenset(
    {"", "apps", "batch", "policy", "networking.k8s.io", "autoscaling", "rbac.authorization.k8s.io"}
)

# patchMergeKey of the lists that strategic merge merges (from the Kubernetes API types), by field name.
# Lists not named here are replaced whole, as their API type says (e.g. tolerations, args, command).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
# `ports` merges by containerPort in a container and by port in a Service.
PORTS_KEY = {"containers": "containerPort", "spec": "port"}

_SUPPORTED_KEYS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "components",
        "namespace",
        "labels",
        "images",
        "patches",
        "configMapGenerator",
    }
)


class UnsupportedKustomization(NotImplementedError):
    """The kustomization uses a feature this renderer does not implement faithfully."""


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render_with_kubectl(path: Path) -> list[dict[str, Any]]:
    exe = kubectl()
    if exe is None:
        raise FileNotFoundError("kubectl is not installed")
    out = subprocess.run([exe, "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render(path: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize PATH` would print (order aside), with the Python renderer."""
    return _build(Path(path).resolve(), expect_kind="Kustomization")


def render_any(path: Path) -> tuple[list[dict[str, Any]], str]:
    """kubectl where it exists, else the Python renderer; returns (objects, which)."""
    if kubectl() is not None:
        return render_with_kubectl(path), "kubectl kustomize"
    return render(path), "python renderer"


def object_key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


# ----------------------------------------------------------------------------------------------------------


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text()) or {}
            unknown = set(data) - _SUPPORTED_KEYS
            if unknown:
                raise UnsupportedKustomization(f"{candidate}: unsupported fields {sorted(unknown)}")
            return data
    raise FileNotFoundError(f"no kustomization file in {directory}")


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _build(directory: Path, expect_kind: str) -> list[dict[str, Any]]:
    k = _load_kustomization(directory)
    kind = k.get("kind", "Kustomization")
    if kind != expect_kind:
        raise UnsupportedKustomization(f"{directory}: expected a {expect_kind}, found {kind}")
    objects = _accumulate(directory, k.get("resources", []))
    for component in k.get("components", []):
        objects = _apply_component((directory / component).resolve(), objects)
    objects.extend(_generate(directory, k))
    return _transform(directory, k, objects)


def _accumulate(directory: Path, entries: Iterable[str]) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for entry in entries:
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(_build(target, expect_kind="Kustomization"))
        elif target.is_file():
            objects.extend(_load_documents(target))
        else:
            raise UnsupportedKustomization(f"{directory}: resource {entry} is neither a file nor a directory")
    _check_unique(objects)
    return objects


def _apply_component(directory: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    k = _load_kustomization(directory)
    if k.get("kind") != "Component":
        raise UnsupportedKustomization(f"{directory}: a component must be of kind Component")
    combined = objects + _accumulate(directory, k.get("resources", []))
    for component in k.get("components", []):
        combined = _apply_component((directory / component).resolve(), combined)
    combined.extend(_generate(directory, k))
    _check_unique(combined)
    return _transform(directory, k, combined)


def _check_unique(objects: list[dict[str, Any]]) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        key = object_key(obj)
        if key in seen:
            raise ValueError(f"duplicate object {key}")
        seen.add(key)


def _generate(directory: Path, k: dict[str, Any]) -> list[dict[str, Any]]:
    generated = []
    for gen in k.get("configMapGenerator", []):
        unknown = set(gen) - {"name", "files", "literals", "options"}
        if unknown:
            raise UnsupportedKustomization(f"configMapGenerator: unsupported fields {sorted(unknown)}")
        options = gen.get("options", {})
        if options.get("disableNameSuffixHash") is not True:
            raise UnsupportedKustomization("configMapGenerator without disableNameSuffixHash: true")
        if set(options) - {"disableNameSuffixHash", "labels", "annotations"}:
            raise UnsupportedKustomization(f"configMapGenerator options {sorted(options)}")
        data: dict[str, str] = {}
        for spec in gen.get("files", []):
            key, _, rel = spec.rpartition("=") if "=" in spec else ("", "", spec)
            path = (directory / rel).resolve()
            if directory not in path.parents:
                raise UnsupportedKustomization(f"{spec}: files must lie under the kustomization directory")
            data[key or path.name] = path.read_text()
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        meta: dict[str, Any] = {"name": gen["name"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        if options.get("annotations"):
            meta["annotations"] = dict(options["annotations"])
        generated.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return generated


def _transform(directory: Path, k: dict[str, Any], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    objects = [copy.deepcopy(obj) for obj in objects]
    for patch_spec in k.get("patches", []):
        _apply_patch(directory, patch_spec, objects)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    for label_spec in k.get("labels", []):
        if label_spec.get("includeSelectors") or label_spec.get("includeTemplates"):
            raise UnsupportedKustomization("labels with includeSelectors/includeTemplates")
        if set(label_spec) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise UnsupportedKustomization(f"labels: unsupported fields {sorted(label_spec)}")
        for obj in objects:
            labels = obj.setdefault("metadata", {}).setdefault("labels", {})
            labels.update({str(name): str(value) for name, value in label_spec["pairs"].items()})
    for image in k.get("images", []):
        if set(image) - {"name", "newName", "newTag", "digest"}:
            raise UnsupportedKustomization(f"images: unsupported fields {sorted(image)}")
        for obj in objects:
            for container in _pod_containers(obj):
                container["image"] = _retag(container.get("image", ""), image)
    return objects


def _pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod_spec = obj.get("spec", {}).get("template", {}).get("spec")
    if obj["kind"] == "Pod":
        pod_spec = obj.get("spec")
    if not isinstance(pod_spec, dict):
        return []
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def _split_image(image: str) -> tuple[str, str, str]:
    name, digest = (image.split("@", 1) + [""])[:2] if "@" in image else (image, "")
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def _retag(image: str, spec: dict[str, str]) -> str:
    name, tag, digest = _split_image(image)
    if name != spec["name"]:
        return image
    name = spec.get("newName", name)
    if "digest" in spec:
        return f"{name}@{spec['digest']}"
    tag = spec.get("newTag", tag)
    result = f"{name}:{tag}" if tag else name
    return f"{result}@{digest}" if digest and "newTag" not in spec else result


def _apply_patch(directory: Path, spec: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    if set(spec) - {"path", "patch"}:
        raise UnsupportedKustomization(f"patches: only path/patch without target are supported, got {sorted(spec)}")
    docs = _load_documents(directory / spec["path"]) if "path" in spec else list(yaml.safe_load_all(spec["patch"]))
    for patch in docs:
        if not patch:
            continue
        if isinstance(patch, list):
            raise UnsupportedKustomization("JSON 6902 patches")
        name = patch["metadata"]["name"]
        matches = [
            obj
            for obj in objects
            if obj["kind"] == patch["kind"]
            and obj["apiVersion"] == patch["apiVersion"]
            and obj["metadata"]["name"] == name
            and patch["metadata"].get("namespace", obj["metadata"].get("namespace")) == obj["metadata"].get("namespace")
        ]
        if len(matches) != 1:
            raise ValueError(f"patch for {patch['kind']}/{name} matches {len(matches)} objects")
        target = matches[0]
        group = target["apiVersion"].rpartition("/")[0]
        strategic = group in BUILTIN_GROUPS
        merged = _merge(target, patch, strategic=strategic, field="")
        target.clear()
        target.update(merged)


def _merge(base: Any, patch: Any, *, strategic: bool, field: str, parent: str = "") -> Any:
    if isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise UnsupportedKustomization(f"strategic merge directives in {field}: {sorted(patch)}")
        result = dict(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = _merge(result.get(key), value, strategic=strategic, field=key, parent=field)
        return result
    if isinstance(patch, list) and strategic and isinstance(base, list):
        key = PORTS_KEY.get(parent) if field == "ports" else MERGE_KEYS.get(field)
        if key is not None:
            return _merge_list(base, patch, key, field)
    return copy.deepcopy(patch)


def _merge_list(base: list[Any], patch: list[Any], key: str, field: str) -> list[Any]:
    result = [copy.deepcopy(item) for item in base]
    added = []
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise UnsupportedKustomization(f"{field}: list item without its merge key {key}")
        for index, existing in enumerate(result):
            if isinstance(existing, dict) and existing.get(key) == item[key]:
                result[index] = _merge(existing, item, strategic=True, field=field)
                break
        else:
            added.append(copy.deepcopy(item))
    # As Kustomize does: items only in the patch come first, in the patch's order.
    return added + result
