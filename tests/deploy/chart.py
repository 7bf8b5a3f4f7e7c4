"""Rendering and validating the Helm chart in deploy/helm/tandem, offline.

    render(values)              `helm template` with a values override -> the rendered documents
    helm(*args)                 run helm (from scripts/setup.sh --test) -> CompletedProcess
    crd_validator(kind)         a jsonschema validator for a KubeRay kind, strict about field names
    validate_core(doc, version) kubernetes-validate --strict on a core kind, raises on any error

KubeRay's CRD schemas are OpenAPI v3 as Kubernetes stores them: the API server prunes fields a
schema does not name, so a misspelt field would vanish silently. `strict_schema` turns every
object that lists its properties into one that rejects any other (as `kubeconform -strict` does),
which makes a misspelling a validation error here. Nothing here talks to a cluster.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tandem"
CRDS = Path(__file__).resolve().parent / "crds"
CRD_FILES = {"RayCluster": CRDS / "ray.io_rayclusters.yaml"}
RELEASE, NAMESPACE = "demo", "serving"
FULLNAME = "demo-tandem"  # the release's resource prefix and the RayCluster's name
# Rendered for this Kubernetes version; core kinds validated against the oldest the chart
# supports (Chart.yaml kubeVersion) and the newest kubernetes-validate bundles.
KUBE_VERSION = "1.33.0"
VALIDATE_VERSIONS = ("1.27.0", "1.37.0")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class HelmError(RuntimeError):
    """helm exited non-zero; the message carries its stderr."""


def helm_binary() -> str:
    """$TANDEM_HELM, else the virtual environment's helm (scripts/setup.sh --test), else PATH."""
    candidates = [os.environ.get("TANDEM_HELM"), str(Path(sys.prefix) / "bin" / "helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("helm")
    if found is None:
        raise FileNotFoundError("no helm binary: run scripts/setup.sh --test (or set TANDEM_HELM)")
    return found


@functools.cache
def _helm_home() -> str:
    """Helm's cache/config/data in a private folder: no state from the user's helm leaks in."""
    return tempfile.mkdtemp(prefix="tandem-helm-")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    home = _helm_home()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": home,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }
    return subprocess.run(
        [helm_binary(), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart rendered with `values` layered over values.yaml; raises HelmError on failure."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as override:
        yaml.safe_dump(values or {}, override)
        override.flush()
        result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                      "--kube-version", KUBE_VERSION, "-f", override.name)  # fmt: skip
    if result.returncode != 0:
        raise HelmError(result.stderr.strip())
    return [doc for doc in yaml.load_all(result.stdout, Loader=Loader) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}"
    return found[0]


def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 (structural) schema as JSON Schema that rejects unknown fields:
    objects with `properties` and no `additionalProperties` or x-kubernetes-preserve-unknown-fields
    get additionalProperties false; `nullable` becomes a null type."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: strict_schema(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "not"):
        if key in out:
            out[key] = strict_schema(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(s) for s in out[key]]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str, version: str = "v1") -> jsonschema.protocols.Validator:
    """A validator for `kind` (a KubeRay CRD copied into tests/deploy/crds) at API `version`."""
    crd = yaml.load(CRD_FILES[kind].read_text(), Loader=Loader)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict_schema(served["schema"]["openAPIV3Schema"])
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of a rendered custom resource, as "path: message" lines."""
    version = doc["apiVersion"].split("/")[1]
    errors = crd_validator(doc["kind"], version).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def validate_core(doc: dict[str, Any], version: str) -> None:
    """kubernetes-validate --strict on one core document; raises its ValidationError."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


def pod_from_template(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A Pod built from a RayCluster group's pod template, to validate it as a core kind."""
    metadata = {"name": name, **template.get("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
