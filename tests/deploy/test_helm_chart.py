"""The Helm chart (deploy/helm/tandem), checked offline: helm lint, helm template with several
values sets, the RayCluster against KubeRay's CRD schema (strict about field names), core kinds
with kubernetes-validate --strict, KubeRay's own admission rules, the router's command line
against Tandem's CLI parser (every flag known, the values it parses to, the autoscaling policy it
builds), metrics/ServiceMonitor/dashboard objects, and misspellings that must be caught."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    FULLNAME,
    REPO,
    VALIDATE_VERSIONS,
    HelmError,
    by_kind,
    crd_errors,
    helm,
    one,
    pod_from_template,
    render,
    validate_core,
)

DASHBOARD = REPO / "deploy" / "grafana" / "tandem-dashboard.json"
CHART_DASHBOARD = CHART / "dashboards" / "tandem-dashboard.json"  # Helm reads only the chart

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-redis": {
        "redis": {
            "enabled": False,
            "external": {
                "url": "rediss://redis.example.internal:6380/2",
                "existingSecret": "tandem-redis-external",
                "caSecret": "tandem-redis-ca",
            },
        }
    },
    "no-redis-no-netpol": {"redis": {"enabled": False}, "networkPolicy": {"enabled": False}},
    "big-gpu-pods": {
        "tandem": {"prefillWorkers": 4, "decodeWorkers": 8, "model": "/models/llama-3-8b"},
        "model": {"volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
        "prefill": {
            "workersPerPod": 2,
            "minReplicas": 1,
            "replicas": 2,
            "maxReplicas": 8,
            "idleTimeoutSeconds": 900,
        },
        "decode": {"workersPerPod": 8, "replicas": 1, "maxReplicas": 2},
        "ray": {"auth": {"secretName": "tandem-ray-token"}},
        "redis": {"auth": {"existingSecret": "tandem-redis", "secretKey": "redis-password"}},
        "router": {"service": {"type": "LoadBalancer"}},
        "networkPolicy": {"routerFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
    },
    "cpu-fixed-size": {
        "tandem": {"device": "cpu", "poolResources": False, "verbose": True},
        "ray": {"autoscaler": {"enabled": False}, "auth": {"enabled": False}},
        "prefill": {"minReplicas": 1, "replicas": 1, "maxReplicas": 1},
        "decode": {"minReplicas": 1, "replicas": 1, "maxReplicas": 1},
    },
    "observability": {
        "tandem": {
            "autoscaling": {
                "prefill": {"minWorkers": 2, "targetQueuedTokens": 4096, "targetTtftMs": 500},
                "decode": {"maxWorkers": 3, "targetKvUsage": 0.7, "targetItlMs": 40.5},
            }
        },
        "prefill": {"replicas": 2, "maxReplicas": 6},
        "metrics": {
            "port": 9100,
            "service": {"port": 8081, "annotations": {"prometheus.io/path": "/metrics"}},
            "serviceMonitor": {
                "enabled": True,
                "scrapeTimeout": "10s",
                "labels": {"release": "kube-prometheus-stack"},
            },
        },
        "tracing": {"otlpEndpoint": "otel-collector.observability.svc:4317"},
        "grafana": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Tandem"}}},
        "networkPolicy": {
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
            ]
        },
    },
    "no-metrics-no-autoscaling": {
        "tandem": {"autoscaling": {"enabled": False}},
        "metrics": {"enabled": False},
        "router": {"auth": {"enabled": False}, "admin": {"drainOnStop": False}},
    },
    "api-keys-secret": {
        "router": {
            "auth": {"existingSecret": "tandem-keys", "secretKey": "keys", "tenantMaxInflight": 8},
            "admin": {"existingSecret": "tandem-admin", "drainTimeoutSeconds": 120},
        },
    },
    "redis-tls-kv-secret": {
        "redis": {"tls": {"enabled": True, "secretName": "tandem-redis-tls"}},
        "kv": {
            "portRange": {"min": 47000, "max": 47099},
            "interface": "eth1",
            "secret": {"existingSecret": "tandem-kv", "secretKey": "kv-secret"},
        },
        "networkPolicy": {"apiServerTo": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]},
    },
    "fp8": {
        "tandem": {
            "model": "/models/llama-3-8b",
            "quantization": "fp8",
            "fp8WeightCalibration": "gptq",
            "kvCacheDtype": "fp8",
            "kvCacheScalesFile": "/models/llama-3-8b.kv-scales.json",
        },
        "model": {"volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
    },
}
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def merged(name: str) -> dict[str, Any]:
    """values.yaml with the variant's values layered over it, as Helm merges them."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {k: merge(base.get(k), v) for k, v in over.items()} | {
                k: v for k, v in base.items() if k not in over
            }
        return copy.deepcopy(over)

    return merge(DEFAULTS, VARIANTS[name])


def autoscale_bounds(values: dict[str, Any], pool: str) -> tuple[int, int]:
    """Tandem's min/max workers of a pool: given, else the group's replicas x workersPerPod."""
    group, given = values[pool], values["tandem"]["autoscaling"][pool]
    pods = group["maxReplicas"] if values["ray"]["autoscaler"]["enabled"] else group["replicas"]
    low = given["minWorkers"] or max(1, group["minReplicas"] * group["workersPerPod"])
    high = given["maxWorkers"] or pods * group["workersPerPod"]
    return low, high


@functools.cache
def docs_of(name: str) -> list[dict[str, Any]]:
    """A variant rendered once per test session (tests that change documents copy them)."""
    return render(VARIANTS[name])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, docs_of(request.param)


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return docs_of("defaults")


def raycluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "RayCluster", FULLNAME)


def head_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_group(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    groups = raycluster(docs)["spec"]["workerGroupSpecs"]
    (group,) = [g for g in groups if g["groupName"] == name]
    return group


def serve_argv(docs: list[dict[str, Any]]) -> list[str]:
    """The `tandem ... serve ...` command line from the head container's script."""
    script = head_container(docs)["args"][0]
    (line,) = [ln for ln in script.splitlines() if ln.strip().startswith("tandem ")]
    argv = shlex.split(line)
    assert argv[-1] == "&", f"the router must run beside ray start: {line!r}"
    return argv[1:-1]


# --- helm itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_is_clean(variant: str, tmp_path: Path) -> None:
    """Lint renders every template, NOTES.txt included, with each values set."""
    override = tmp_path / "values.yaml"
    override.write_text(yaml.safe_dump(VARIANTS[variant]))
    result = helm("lint", "--strict", str(CHART), "-f", str(override))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_every_value_is_documented_and_in_the_schema() -> None:
    """Each key of values.yaml has a comment above it (a `# --` one documents a value, whose
    nested defaults need none), and values.yaml and values.schema.json name the same keys."""
    undocumented: list[str] = []
    value_indent = None  # indent of the documented value whose default we are inside
    commented = marks_value = False  # about the comment block right above the current line
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        text = line.strip()
        if text.startswith("#"):
            marks_value = (commented and marks_value) or text.startswith("# --")
            commented = True
            continue
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if match and (value_indent is None or len(match.group(1)) <= value_indent):
            if not commented:
                undocumented.append(f"{number}: {text}")
            value_indent = len(match.group(1)) if marks_value else None
        if text:
            commented = marks_value = False
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert keys_of(values) == keys_of(schema, schema=True) - {"global"}


def keys_of(node: dict[str, Any], schema: bool = False, prefix: str = "") -> set[str]:
    """Dotted key paths down to each documented value (schema: through `properties`)."""
    children = node.get("properties", {}) if schema else node
    keys = set()
    for key, child in children.items():
        keys.add(prefix + key)
        if schema:
            nested = child.get("additionalProperties") is False
        else:
            nested = isinstance(child, dict) and prefix + key in STRUCTURED
        if nested:
            keys |= keys_of(child, schema, f"{prefix}{key}.")
    return keys


# Values that are sections (their keys are values themselves), as opposed to free-form
# Kubernetes objects such as resources or nodeSelector.
STRUCTURED = {
    "image", "tandem", "model", "router", "router.service", "router.probes", "router.auth",
    "router.admin",
    "ray", "ray.auth",
    "ray.dashboard", "ray.head", "ray.autoscaler", "prefill", "decode", "redis", "redis.auth",
    "redis.image", "redis.external", "redis.tls", "kv", "kv.portRange", "kv.secret",
    "networkPolicy", "tandem.autoscaling",
    "tandem.autoscaling.prefill", "tandem.autoscaling.decode", "metrics", "metrics.service",
    "metrics.serviceMonitor", "tracing", "grafana", "grafana.dashboard",
    "prefill.resources", "decode.resources", "ray.head.resources", "ray.autoscaler.resources",
    "redis.resources",
}  # fmt: skip


# --- what each values set renders ------------------------------------------------------------


def test_rendered_raycluster_matches_kuberay_crd(rendered: tuple[str, list]) -> None:
    _, docs = rendered
    for doc in by_kind(docs, "RayCluster"):
        assert crd_errors(doc) == []


@pytest.mark.parametrize("version", VALIDATE_VERSIONS)
def test_core_kinds_pass_kubernetes_validate_strict(rendered: tuple[str, list], version: str):
    _, docs = rendered
    cluster = raycluster(docs)["spec"]
    templates = [("head", cluster["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    pods = [pod_from_template(t, f"{FULLNAME}-{name}") for name, t in templates]
    core = [doc for doc in docs if doc["kind"] not in ("RayCluster", "ServiceMonitor")]
    assert core, "nothing but the RayCluster rendered"
    for doc in core + pods:
        validate_core(doc, version)


def test_kuberay_admission_rules(rendered: tuple[str, list]) -> None:
    """What KubeRay's operator checks beyond the CRD schema (ray-operator's validation.go)."""
    _, docs = rendered
    spec = raycluster(docs)["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        params = group.get("rayStartParams", {})
        assert "labels" not in params, "use the group's labels field"
        if group.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
    v2 = spec.get("enableInTreeAutoscaling") and spec["autoscalerOptions"]["version"] == "v2"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert "idleTimeoutSeconds" not in group or v2
        assert group["template"]["spec"]["containers"], group["groupName"]
    if spec.get("authOptions", {}).get("mode") == "token":
        major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), "token authentication needs Ray 2.52.0 or later"


def test_router_command_parses_with_tandem_cli(rendered: tuple[str, list]) -> None:
    """The head's `tandem serve` line against the real parser: every flag is one it knows, the
    parsed values are the chart's values, and the autoscaling policy builds from them."""
    from cluster.cli import autoscaling_config, build_parser, engine_config

    name, docs = rendered
    args, unknown = build_parser().parse_known_args(serve_argv(docs))
    assert unknown == []
    values = merged(name)
    tandem = values["tandem"]
    assert (args.command, args.host, args.port, args.address) == ("serve", "0.0.0.0", 50051, "auto")
    assert (args.mode, args.device) == ("disaggregated", tandem["device"])
    assert (args.prefill_workers, args.decode_workers) == (
        tandem["prefillWorkers"],
        tandem["decodeWorkers"],
    )
    assert args.model == (tandem["model"] or None)
    assert args.cache_weight == tandem["cacheWeight"]
    for pool in ("prefill", "decode"):  # null: Tandem's defaults; the same for both pools
        engine = engine_config(args, pool)  # raises on FP8 options Tandem would refuse
        assert (engine.quantization, engine.fp8_weight_calibration, engine.kv_cache_dtype,
                engine.kv_cache_scales, engine.kv_cache_scales_path) == (
            tandem["quantization"], tandem["fp8WeightCalibration"],
            tandem["kvCacheDtype"] or "auto",
            (tandem["kvCacheScales"] or "per-head").replace("-", "_"), tandem["kvCacheScalesFile"],
        ), pool  # fmt: skip
    metrics = values["metrics"]
    assert args.metrics_port == (metrics["port"] if metrics["enabled"] else None)
    assert args.otlp_endpoint == (values["tracing"]["otlpEndpoint"] or None)
    auth = values["router"]["auth"]
    keys_file = f"/etc/tandem/api-keys/{auth['secretKey']}" if auth["enabled"] else None
    assert (args.api_keys_file, args.tenant_max_inflight) == (
        keys_file,
        auth["tenantMaxInflight"] if auth["enabled"] else None,
    )

    scaling = tandem["autoscaling"]
    assert args.autoscale is scaling["enabled"]
    config = autoscaling_config(args)  # raises on bounds Tandem would refuse
    assert config.enabled is scaling["enabled"]
    targets = {
        "target_queued_tokens": scaling["prefill"]["targetQueuedTokens"],
        "target_ttft_ms": scaling["prefill"]["targetTtftMs"],
        "target_kv_usage": scaling["decode"]["targetKvUsage"],
        "target_itl_ms": scaling["decode"]["targetItlMs"],
    }
    for pool in ("prefill", "decode"):
        low, high = getattr(args, f"{pool}_min_workers"), getattr(args, f"{pool}_max_workers")
        if not scaling["enabled"]:
            assert (low, high) == (None, None)
            continue
        assert (low, high) == autoscale_bounds(values, pool)
        policy = getattr(config, pool)
        assert (policy.min_workers, policy.max_workers) == (low, high)
    for dest, value in targets.items():
        assert getattr(args, dest) == (value if scaling["enabled"] else None), dest
    if scaling["enabled"] and targets["target_ttft_ms"] is not None:
        assert config.prefill.targets["ttft"] == targets["target_ttft_ms"] / 1000


def test_autoscaling_bounds_default_to_the_groups() -> None:
    """Defaults: each pool may use every slot its group can have (maxReplicas x workersPerPod)
    and keeps minReplicas x workersPerPod, at least one; with Ray's autoscaler off, the fixed
    replicas bound it."""
    cases = {"defaults": (1, 4, 1, 4), "big-gpu-pods": (2, 16, 1, 16),
             "cpu-fixed-size": (1, 1, 1, 1), "observability": (2, 6, 1, 3)}  # fmt: skip
    for name, expected in cases.items():
        argv = serve_argv(docs_of(name))
        flags = ("--prefill-min-workers", "--prefill-max-workers",
                 "--decode-min-workers", "--decode-max-workers")  # fmt: skip
        assert tuple(int(argv[argv.index(f) + 1]) for f in flags) == expected, name
        assert "--autoscale" in argv


def test_pools_pinned_to_their_groups(rendered: tuple[str, list]) -> None:
    """Each pool's workers ask for a Ray resource that only its group's pods offer, one per
    worker slot, and (on cuda) the pods get one GPU per slot."""
    name, docs = rendered
    values = VARIANTS[name]
    argv = serve_argv(docs)
    cuda = values.get("tandem", {}).get("device", "cuda") == "cuda"
    pinned = values.get("tandem", {}).get("poolResources", True)
    for pool in ("prefill", "decode"):
        group = worker_group(docs, pool)
        slots = values.get(pool, {}).get("workersPerPod", 1)
        container = group["template"]["spec"]["containers"][0]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (str(slots) if cuda else None)
        if pinned:
            assert group["resources"] == {f"tandem_{pool}": str(slots)}
            request = argv[argv.index(f"--{pool}-resources") + 1]
            assert yaml.safe_load(request) == {f"tandem_{pool}": 1}
        else:
            assert "resources" not in group and f"--{pool}-resources" not in argv


def test_only_the_router_port_is_exposed(rendered: tuple[str, list]) -> None:
    """Clients get the router's gRPC port; /metrics has a ClusterIP Service of its own, so a
    LoadBalancer router Service never publishes it."""
    name, docs = rendered
    values = merged(name)
    metrics = values["metrics"]
    head = raycluster(docs)["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    ports = {p["name"]: p["containerPort"] for p in head_container(docs)["ports"]}
    expected = {"gcs-server": 6379, "grpc": 50051}  # KubeRay's head Service copies these
    if metrics["enabled"]:  # not "metrics": KubeRay's name for Ray's own metrics port
        expected["tandem-metrics"] = metrics["port"]
    assert ports == expected
    assert not by_kind(docs, "Ingress")
    head_selector = {"ray.io/cluster": FULLNAME, "ray.io/node-type": "head"}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    router = services.pop(FULLNAME)["spec"]
    assert [p["port"] for p in router["ports"]] == [50051]
    assert router["selector"] == head_selector
    metrics_service = services.pop(f"{FULLNAME}-metrics", None)
    assert (metrics_service is not None) == metrics["enabled"]
    if metrics_service:
        assert metrics_service["spec"]["selector"] == head_selector
        assert metrics_service["spec"]["publishNotReadyAddresses"] is True  # during startup
        assert metrics_service["spec"]["ports"] == [
            {"name": "metrics", "port": metrics["service"]["port"],
             "targetPort": "tandem-metrics", "protocol": "TCP", "appProtocol": "http"}
        ]  # fmt: skip
    for service in [metrics_service or {"spec": {}}, *services.values()]:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    if values["networkPolicy"]["enabled"]:
        ray_policy = policies[f"{FULLNAME}-ray"]
        (ray_rule, *extra) = ray_policy["ingress"]
        assert ray_rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME}}}]
        assert extra == values["networkPolicy"]["extraRayIngress"]
        router_rule, *metrics_rules = policies[f"{FULLNAME}-router"]["ingress"]
        assert router_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
        assert router_rule.get("from", []) == values["networkPolicy"]["routerFrom"]
        if metrics["enabled"]:
            (rule,) = metrics_rules
            assert rule["ports"] == [{"port": metrics["port"], "protocol": "TCP"}]
            assert rule.get("from", []) == values["networkPolicy"]["metricsFrom"]
        else:
            assert metrics_rules == []
    else:
        assert not policies


def test_metrics_service_is_annotated_for_prometheus(default_docs: list[dict[str, Any]]) -> None:
    service = one(default_docs, "Service", f"{FULLNAME}-metrics")
    assert service["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9464",
        "prometheus.io/path": "/metrics",
        "prometheus.io/scheme": "http",
    }
    assert "--metrics-port" in serve_argv(default_docs)
    # Off by default: the ServiceMonitor (needs the prometheus-operator) and the dashboard.
    assert not by_kind(default_docs, "ServiceMonitor") and not by_kind(default_docs, "ConfigMap")


def test_service_monitor_selects_the_metrics_service() -> None:
    """The prometheus-operator's CRD is not bundled here: its shape is checked by hand, and the
    objects it points at are checked against the rendered Service."""
    docs = docs_of("observability")
    service = one(docs, "Service", f"{FULLNAME}-metrics")
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    monitor = one(docs, "ServiceMonitor", FULLNAME)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == {"namespaceSelector", "selector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": ["serving"]}
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [s for s in by_kind(docs, "Service")
            if selector.items() <= s["metadata"]["labels"].items()] == [service]  # fmt: skip
    assert spec["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http",
         "interval": "30s", "scrapeTimeout": "10s"}
    ]  # fmt: skip
    assert service["spec"]["ports"][0]["name"] == "metrics"


def test_dashboard_configmap_carries_the_dashboard() -> None:
    configmap = one(docs_of("observability"), "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Tandem"}
    (text,) = configmap["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text())


def test_chart_copy_of_the_dashboard_is_identical() -> None:
    """Helm reads files only inside the chart, so the chart carries a copy of the dashboard:
    after changing deploy/grafana/tandem-dashboard.json, copy it over."""
    assert CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), (
        f"cp {DASHBOARD.relative_to(REPO)} {CHART_DASHBOARD.relative_to(REPO)}"
    )


def test_ray_token_authentication(rendered: tuple[str, list]) -> None:
    name, docs = rendered
    auth = VARIANTS[name].get("ray", {}).get("auth", {})
    spec = raycluster(docs)["spec"]
    if auth.get("enabled", True):
        expected = {"mode": "token"}
        if auth.get("secretName"):
            expected["secretName"] = auth["secretName"]
        assert spec["authOptions"] == expected
    else:
        assert "authOptions" not in spec


def test_head_probes_use_grpc_health() -> None:
    container = head_container(docs_of("defaults"))
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "tandem.v1.Tandem"}
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    startup = container["startupProbe"]
    assert startup["grpc"] == {"port": 50051, "service": ""}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def test_head_runs_ray_and_the_router_together(default_docs: list[dict[str, Any]]) -> None:
    template = raycluster(default_docs)["spec"]["headGroupSpec"]["template"]
    assert template["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    script = head_container(default_docs)["args"][0]
    assert 'eval "$KUBERAY_GEN_RAY_START_CMD" &' in script
    assert script.index("ray health-check") < script.index("tandem serve")
    assert raycluster(default_docs)["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("grace", [30, 7.5, 0])
def test_termination_grace_covers_the_drain(grace: float) -> None:
    """SIGTERM drains the router for --shutdown-grace seconds after the preStop sleep; the
    pod's termination grace leaves room for both and for stopping the workers and Ray."""
    from cluster.cli import build_parser

    docs = render({"tandem": {"shutdownGraceSeconds": grace, "preStopSleepSeconds": 4}})
    spec = raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]
    container = head_container(docs)
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "4"]
    args, unknown = build_parser().parse_known_args(serve_argv(docs))
    assert unknown == [] and args.shutdown_grace == grace
    assert spec["terminationGracePeriodSeconds"] >= 4 + grace + 30


def test_autoscaler_defaults(default_docs: list[dict[str, Any]]) -> None:
    spec = raycluster(default_docs)["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["upgradeStrategy"] == {"type": "Recreate"}  # so helm upgrade takes effect
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] >= 60
    for pool in ("prefill", "decode"):
        group = worker_group(default_docs, pool)
        assert (group["minReplicas"], group["maxReplicas"]) == (0, 4)


@pytest.mark.parametrize("variant", ["defaults", "big-gpu-pods", "external-redis"])
def test_router_gets_the_redis_password_from_a_secret(variant: str) -> None:
    docs = docs_of(variant)
    env = {e["name"]: e for e in head_container(docs).get("env", [])}
    ref = env["TANDEM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    argv = serve_argv(docs)
    url = argv[argv.index("--redis-url") + 1]
    for pool in ("prefill", "decode"):  # workers get it from the router, not the environment
        container = worker_group(docs, pool)["template"]["spec"]["containers"][0]
        assert "TANDEM_REDIS_PASSWORD" not in {e["name"] for e in container.get("env", [])}
    if variant == "external-redis":
        assert url == "rediss://redis.example.internal:6380/2"
        assert ref == {"name": "tandem-redis-external", "key": "password"}
        assert argv[argv.index("--redis-tls-ca-file") + 1] == "/etc/tandem/redis-ca/ca.crt"
        assert not by_kind(docs, "Deployment")
        return
    assert url == f"redis://{FULLNAME}-redis:6379/0"
    redis = one(docs, "Deployment", f"{FULLNAME}-redis")["spec"]["template"]["spec"]
    (container,) = redis["containers"]
    # never a process argument nor an environment variable: a config file from the Secret
    assert "requirepass" not in " ".join(container["command"])
    assert "env" not in container
    (script,) = container["args"]
    assert "exec redis-server /run/redis/redis.conf" in script
    assert "printf 'requirepass" in script  # a shell builtin: no process sees the password
    volumes = {v["name"]: v for v in redis["volumes"]}
    assert volumes["config"]["emptyDir"]["medium"] == "Memory"
    password = volumes["password"]["secret"]
    assert {"name": password["secretName"], "key": password["items"][0]["key"]} == ref
    others = (f"{FULLNAME}-kv", f"{FULLNAME}-api-keys", f"{FULLNAME}-admin")
    secrets = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] not in others]
    if variant == "big-gpu-pods":  # an existing Secret: the chart creates none
        assert ref == {"name": "tandem-redis", "key": "redis-password"} and not secrets
    else:
        (secret,) = secrets
        assert secret["metadata"]["name"] == ref["name"] and ref["key"] in secret["data"]


def test_no_redis_means_no_redis_url() -> None:
    docs = docs_of("no-redis-no-netpol")
    assert "--redis-url" not in serve_argv(docs)
    env = {e["name"] for e in head_container(docs)["env"]}
    assert env == {"TANDEM_KV_SECRET_FILE"}
    assert {d["kind"] for d in docs} == {"RayCluster", "Service", "Secret"}  # the KV secret


def test_security_contexts(default_docs: list[dict[str, Any]]) -> None:
    spec = raycluster(default_docs)["spec"]
    templates = [spec["headGroupSpec"]["template"]]
    templates += [g["template"] for g in spec["workerGroupSpecs"]]
    templates.append(one(default_docs, "Deployment")["spec"]["template"])
    for template in templates:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in template["spec"]["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


# --- FP8 -------------------------------------------------------------------------------------

# The FP8 values of the chart (tandem.*) and the `tandem serve` flags they become.
FP8_FLAGS = {
    "quantization": "--quantization",
    "fp8WeightCalibration": "--fp8-weight-calibration",
    "kvCacheDtype": "--kv-cache-dtype",
    "kvCacheScales": "--kv-cache-scales",
    "kvCacheScalesFile": "--kv-cache-scales-file",
}


@pytest.mark.parametrize(
    "fp8",
    [
        {},
        {"quantization": "fp8"},
        {"quantization": "fp8", "fp8WeightCalibration": "gptq"},
        {"kvCacheDtype": "auto"},
        {"kvCacheDtype": "fp8"},
        {"kvCacheDtype": "fp8", "kvCacheScales": "per-token"},
        {"quantization": "fp8", "kvCacheDtype": "fp8", "kvCacheScales": "per-head",
         "kvCacheScalesFile": "/models/Llama 3/kv-scales.json"},
    ],
    ids=["defaults", "weights", "weights-gptq", "kv-auto", "kv-fp8", "kv-per-token",
         "all-with-file"],
)  # fmt: skip
def test_fp8_values_become_serve_flags_for_both_pools(fp8: dict[str, str]) -> None:
    """Each FP8 value set is passed once, as its `tandem serve` flag; a null one is not passed
    at all (none by default), and both pools' engines get the same values."""
    from cluster.cli import build_parser, engine_config

    argv = serve_argv(render({"tandem": fp8}))
    passed = {flag: argv[argv.index(flag) + 1] for flag in FP8_FLAGS.values() if flag in argv}
    assert passed == {FP8_FLAGS[key]: value for key, value in fp8.items()}
    assert all(argv.count(flag) <= 1 for flag in FP8_FLAGS.values()), argv
    args, unknown = build_parser().parse_known_args(argv)
    assert unknown == []
    for pool in ("prefill", "decode"):
        engine = engine_config(args, pool)
        assert engine.quantization == fp8.get("quantization")
        assert engine.fp8_weight_calibration == fp8.get("fp8WeightCalibration")
        assert engine.kv_cache_dtype == fp8.get("kvCacheDtype", "auto")
        assert engine.kv_cache_scales == fp8.get("kvCacheScales", "per-head").replace("-", "_")
        assert engine.kv_cache_scales_path == fp8.get("kvCacheScalesFile")


@pytest.mark.parametrize(
    ("key", "value"),
    [("quantization", "int4"), ("quantization", "FP8"), ("fp8WeightCalibration", "awq"),
     ("kvCacheDtype", "fp16"),
     ("kvCacheDtype", "bfloat16"), ("kvCacheScales", "per-channel"),
     ("kvCacheScalesFile", "kv-scales.json"), ("kvCacheScalesFile", "")],
)  # fmt: skip
def test_fp8_value_typos_are_refused_by_the_schema(key: str, value: str) -> None:
    """A value `tandem serve` would not take fails `helm template`/install on the schema, which
    names the key (the scales values beside kvCacheDtype fp8: only the typo is wrong)."""
    fp8 = {"kvCacheDtype": "fp8", "quantization": "fp8", key: value}
    if key == "kvCacheDtype":
        fp8 = {key: value}
    with pytest.raises(HelmError, match=rf"(?s)schema.*\b{key}\b"):
        render({"tandem": fp8})


# --- mistakes that must be caught ----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"prefill": {"replica": 2}}, "replica"),
        ({"ray": {"autoscaler": {"idleTimeoutSecond": 60}}}, "idleTimeoutSecond"),
        ({"tandem": {"device": "tpu"}}, "device"),
        ({"decode": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas <= replicas"),
        ({"prefill": {"rayStartParams": {"num-gpus": "2"}}}, "prefill.rayStartParams.num-gpus"),
        ({"ray": {"autoscaler": {"version": "v1"}}, "decode": {"idleTimeoutSeconds": 60}},
         "idleTimeoutSeconds needs"),
        ({"tandem": {"autoscaling": {"prefill": {"maxWorkers": 5}}}},
         "the prefill group offers only 4 worker slots"),
        ({"tandem": {"autoscaling": {"decode": {"minWorkers": 3, "maxWorkers": 2}}}},
         "need minWorkers <= maxWorkers"),
        ({"prefill": {"minReplicas": 0, "replicas": 0, "maxReplicas": 0}},
         "need minWorkers <= maxWorkers"),
        ({"tandem": {"autoscaling": {"decode": {"targetKvUsage": 1.5}}}}, "targetKvUsage"),
        ({"tandem": {"autoscaling": {"prefill": {"targetTtftMs": 0}}}}, "targetTtftMs"),
        ({"tandem": {"autoscaling": {"prefill": {"minWorker": 2}}}}, "minWorker"),
        ({"metrics": {"port": 50051}}, "metrics.port 50051 is taken"),
        ({"metrics": {"port": 8080}}, "metrics.port 8080 is taken"),
        ({"metrics": {"serviceMonitor": {"interval": "30"}}}, "interval"),
        ({"tracing": {"otlpEndpoint": "http://collector:4317"}}, "otlpEndpoint"),
        ({"networkPolicy": {"metricsFrom": {"podSelector": {}}}}, "metricsFrom"),
        ({"kv": {"portRange": {"min": 40000, "max": 40010}}}, "need max >= min + 63"),
        ({"kv": {"portRange": {"min": 1000, "max": 2000}}}, "min"),
        ({"kv": {"interface": "eth0; rm -rf /"}}, "interface"),
        ({"decode": {"rayStartParams": {"node-manager-port": "40005"}}},
         "decode.rayStartParams.node-manager-port 40005 is in kv.portRange 40000-40999"),
        ({"redis": {"tls": {"enabled": True}}}, "redis.tls.enabled needs redis.tls.secretName"),
        ({"tandem": {"fp8WeightCalibration": "gptq"}}, "set tandem.quantization fp8"),
        ({"tandem": {"kvCacheScales": "per-token"}}, "set tandem.kvCacheDtype fp8"),
        ({"tandem": {"kvCacheDtype": "auto", "kvCacheScales": "per-head"}},
         "set tandem.kvCacheDtype fp8"),
        ({"tandem": {"kvCacheScalesFile": "/models/kv-scales.json"}},
         "tandem.kvCacheScalesFile is a per-head FP8 KV scale table"),
        ({"tandem": {"kvCacheDtype": "fp8", "kvCacheScales": "per-token",
                     "kvCacheScalesFile": "/models/kv-scales.json"}},
         "tandem.kvCacheScalesFile is a per-head FP8 KV scale table"),
        ({"tandem": {"quantization": "fp8", "extraArgs": ["--quantization", "fp8"]}},
         "tandem.quantization sets --quantization, which tandem.extraArgs passes too"),
        ({"tandem": {"kvCacheDtype": "fp8", "extraArgs": ["--kv-cache-dtype=fp8"]}},
         "tandem.kvCacheDtype sets --kv-cache-dtype, which tandem.extraArgs passes too"),
    ],
)  # fmt: skip
def test_bad_values_fail_to_render(override: dict[str, Any], expected: str) -> None:
    with pytest.raises(HelmError, match=re.escape(expected)):
        render(override)


@pytest.mark.parametrize(
    ("path", "misspelt"),
    [
        (("spec", "headGroupSpec", "rayStartParams"), "rayStartParms"),
        (("spec", "workerGroupSpecs", 0, "replicas"), "replica"),
        (("spec", "autoscalerOptions", "idleTimeoutSeconds"), "idleTimeoutSecs"),
        (("spec", "headGroupSpec", "template", "spec", "containers", 0, "readinessProbe"),
         "readinesProbe"),
    ],
)  # fmt: skip
def test_misspelt_raycluster_field_is_caught(
    default_docs: list[dict[str, Any]], path: tuple[str | int, ...], misspelt: str
) -> None:
    cluster = copy.deepcopy(raycluster(default_docs))
    parent = cluster
    for key in path[:-1]:
        parent = parent[key]
    parent[misspelt] = parent.pop(path[-1])
    errors = crd_errors(cluster)
    assert any(repr(misspelt) in error for error in errors), errors


def test_wrong_type_in_raycluster_is_caught(default_docs: list[dict[str, Any]]) -> None:
    cluster = copy.deepcopy(raycluster(default_docs))
    cluster["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "4"
    assert crd_errors(cluster) == [
        "spec.workerGroupSpecs.1.maxReplicas: '4' is not of type 'integer'"
    ]


def test_misspelt_core_field_is_caught(default_docs: list[dict[str, Any]]) -> None:
    service = copy.deepcopy(one(default_docs, "Service", FULLNAME))
    service["spec"]["ports"][0]["targetPrt"] = service["spec"]["ports"][0].pop("targetPort")
    with pytest.raises(kubernetes_validate.ValidationError, match="targetPrt"):
        validate_core(service, VALIDATE_VERSIONS[-1])


# --- KV between the pools: ports, secret, policies (issue 17), and the rest of issue 16.8 -----


def allowed(
    docs: list[dict[str, Any]], source: dict[str, str], target: dict[str, str], port: int
) -> bool:
    """Whether TCP from a pod labelled `source` to `port` of a pod labelled `target` (both in
    the release's namespace) passes the rendered NetworkPolicies: the source's egress and the
    target's ingress, each allowed when no policy of that type selects the pod, else when a
    rule of one of them matches (peers by podSelector matchLabels or ipBlock; no peers: any;
    no ports: any; endPort ranges)."""

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    def port_ok(rule: dict[str, Any]) -> bool:
        ports = rule.get("ports")
        return not ports or any(
            p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])
            for p in ports
        )

    def peer_ok(peers: list[dict[str, Any]] | None, labels: dict[str, str]) -> bool:
        return not peers or any(
            "ipBlock" in peer or ("podSelector" in peer and selects(peer["podSelector"], labels))
            for peer in peers
        )

    def side_ok(pod: dict[str, str], kind: str, peer: dict[str, str]) -> bool:
        policies = [
            p["spec"] for p in by_kind(docs, "NetworkPolicy")
            if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod)
        ]  # fmt: skip
        key, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        rules = [rule for policy in policies for rule in policy.get(key, [])]
        return not policies or any(port_ok(r) and peer_ok(r.get(peers), peer) for r in rules)

    return side_ok(source, "Egress", target) and side_ok(target, "Ingress", source)


def test_kv_ports_open_only_between_the_pools(rendered: tuple[str, list]) -> None:
    """The rendered policies allow exactly prefill <-> decode on the KV range (gloo dials from
    either end), keep Ray's own ports among Ray pods, and let nothing else in."""
    name, docs = rendered
    values = merged(name)
    if not values["networkPolicy"]["enabled"]:
        assert not by_kind(docs, "NetworkPolicy")
        return
    low, high = values["kv"]["portRange"]["min"], values["kv"]["portRange"]["max"]
    cluster = {"ray.io/cluster": FULLNAME}
    pods = {
        "prefill": {**cluster, "app.kubernetes.io/component": "prefill"},
        "decode": {**cluster, "app.kubernetes.io/component": "decode"},
        "head": {**cluster, "ray.io/node-type": "head", "app.kubernetes.io/component": "router"},
        "redis": {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": "demo",
                  "app.kubernetes.io/component": "redis"},
        "stranger": {"app": "something-else"},
    }  # fmt: skip
    for port in (low, (low + high) // 2, high):
        for source, target in [(s, t) for s in pods for t in ("prefill", "decode")]:
            expected = {source, target} == {"prefill", "decode"}
            assert allowed(docs, pods[source], pods[target], port) == expected, (
                f"{source} -> {target}:{port}"
            )
    for port in (low - 1, high + 1, 6380):  # Ray's ports: among Ray pods only
        for target in ("prefill", "decode"):
            assert allowed(docs, pods["head"], pods[target], port)
            assert not allowed(docs, pods["stranger"], pods[target], port)
            assert not allowed(docs, pods["redis"], pods[target], port)
    # The head's Ray ports are random over the whole range (KV range included): workers reach
    # every port of it; strangers only the router's (and metrics') port.
    for port in (1, 6379, low - 1, low, (low + high) // 2, high, high + 1, 65535):
        for source in ("prefill", "decode"):
            assert allowed(docs, pods[source], pods["head"], port), f"{source} -> head:{port}"
        assert not allowed(docs, pods["stranger"], pods["head"], port), f"stranger -> head:{port}"
    if values["redis"]["enabled"]:  # Redis reaches nothing
        assert not allowed(docs, pods["redis"], pods["decode"], 6380)
        assert allowed(docs, pods["decode"], pods["redis"], 6379)
    assert not allowed(docs, pods["prefill"], {"k8s-app": "elsewhere"}, 8000)  # egress too


def test_worker_pods_confine_ephemeral_ports_to_the_kv_range(rendered: tuple[str, list]) -> None:
    """gloo and NCCL listen on ephemeral ports: the worker pods' range is the KV range, and
    Ray's own ports, which it would pick from that range, are pinned outside it."""
    name, docs = rendered
    kv = merged(name)["kv"]
    low, high = kv["portRange"]["min"], kv["portRange"]["max"]
    argv = serve_argv(docs)
    assert argv[argv.index("--kv-ports") + 1] == f"{low}-{high}"
    if kv["interface"]:
        assert argv[argv.index("--kv-interface") + 1] == kv["interface"]
    else:
        assert "--kv-interface" not in argv
    for pool in ("prefill", "decode"):
        group = worker_group(docs, pool)
        sysctls = group["template"]["spec"]["securityContext"]["sysctls"]
        assert {"name": "net.ipv4.ip_local_port_range", "value": f"{low} {high}"} in sysctls
        params = group["rayStartParams"]
        for key in ("node-manager-port", "object-manager-port", "runtime-env-agent-port",
                    "dashboard-agent-grpc-port"):  # fmt: skip
            assert not low <= int(params[key]) <= high, (pool, key)


def test_every_ray_container_has_the_kv_secret_mounted(rendered: tuple[str, list]) -> None:
    name, docs = rendered
    secret = merged(name)["kv"]["secret"]
    secret_name = secret["existingSecret"] or f"{FULLNAME}-kv"
    spec = raycluster(docs)["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["kv-secret"]["secret"]["secretName"] == secret_name
        container = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["TANDEM_KV_SECRET_FILE"] == f"{mounts['kv-secret']}/{secret['secretKey']}"
    created = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == f"{FULLNAME}-kv"]
    assert bool(created) != bool(secret["existingSecret"])
    if created:
        assert len(created[0]["data"][secret["secretKey"]]) >= 24  # base64 of 48 characters


def test_in_cluster_redis_over_tls() -> None:
    docs = docs_of("redis-tls-kv-secret")
    argv = serve_argv(docs)
    assert argv[argv.index("--redis-url") + 1] == f"rediss://{FULLNAME}-redis:6379/0"
    ca_file = argv[argv.index("--redis-tls-ca-file") + 1]
    head = raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert ca_file == f"{mounts['redis-ca']}/ca.crt"
    assert {v["name"]: v for v in head["volumes"]}["redis-ca"]["secret"]["secretName"] == (
        "tandem-redis-tls"
    )
    redis = one(docs, "Deployment", f"{FULLNAME}-redis")["spec"]["template"]["spec"]
    (script,) = redis["containers"][0]["args"]
    assert "echo 'port 0'" in script and "echo 'tls-port 6379'" in script
    assert "--tls" in redis["containers"][0]["readinessProbe"]["exec"]["command"][-1]


def test_head_pod_mounts_no_service_account_token(rendered: tuple[str, list]) -> None:
    """Only the autoscaler sidecar (KubeRay's) talks to the Kubernetes API: it alone gets a
    token; the head container (router, Ray) and the worker pods have none."""
    name, docs = rendered
    spec = raycluster(docs)["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False
    for group in spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in head["volumes"]}
    if merged(name)["ray"]["autoscaler"]["enabled"]:
        (mount,) = spec["autoscalerOptions"]["volumeMounts"]
        assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
        sources = volumes[mount["name"]]["projected"]["sources"]
        assert any("serviceAccountToken" in source for source in sources)
    else:
        assert "kube-api-access" not in volumes
    token_mounts = [
        m for m in head["containers"][0].get("volumeMounts", [])
        if "serviceaccount" in m["mountPath"]
    ]  # fmt: skip
    assert not token_mounts


@pytest.mark.parametrize("variant", ["defaults", "api-keys-secret", "no-metrics-no-autoscaling"])
def test_router_api_keys_come_from_a_secret_mounted_in_the_head_only(variant: str) -> None:
    """On by default (a generated key for tenant "default" that the router's parser accepts),
    or from an existing Secret; off: no flag, no mount, no Secret. Workers never see the keys."""
    from router.auth import parse_api_keys

    docs, auth = docs_of(variant), merged(variant)["router"]["auth"]
    head = raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in head_container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    generated = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-api-keys")]
    for pool in ("prefill", "decode"):
        spec = worker_group(docs, pool)["template"]["spec"]
        assert "api-keys" not in {v["name"] for v in spec.get("volumes", [])}
    if not auth["enabled"]:
        assert "--api-keys-file" not in serve_argv(docs)
        assert "api-keys" not in mounts and "api-keys" not in volumes and not generated
        return
    argv = serve_argv(docs)
    path = Path(argv[argv.index("--api-keys-file") + 1])
    assert mounts["api-keys"] == {"name": "api-keys", "mountPath": str(path.parent),
                                  "readOnly": True}  # fmt: skip
    secret = volumes["api-keys"]["secret"]
    assert secret["items"] == [{"key": auth["secretKey"], "path": path.name}]
    if auth["existingSecret"]:
        assert secret["secretName"] == auth["existingSecret"] and not generated
        return
    (made,) = generated
    assert made["metadata"]["name"] == secret["secretName"] == f"{FULLNAME}-api-keys"
    import base64

    text = base64.b64decode(made["data"][auth["secretKey"]]).decode()
    (tenant,) = parse_api_keys(text, "the chart's Secret").tenants
    assert tenant.name == "default"


@pytest.mark.parametrize("variant", ["defaults", "api-keys-secret", "no-metrics-no-autoscaling"])
def test_worker_pods_drain_their_node_through_the_router_before_stopping(variant: str) -> None:
    """Issue 22.3 (SIGTERM of a worker group): every worker pod's preStop runs `tandem
    drain-node` for its own pod IP (downward API) against the router Service, with the admin
    key read from a mounted Secret (never an env var Ray would inherit), and its termination
    grace covers the drain; the head's router gets the matching keys file (--admin-keys-file),
    which the router's parser accepts and which holds the workers' key. Off: none of it."""
    import base64

    from cluster.cli import build_parser
    from cluster.node_cli import RPC_MARGIN_S
    from router.admin import parse_admin_keys

    docs, values = docs_of(variant), merged(variant)
    admin = values["router"]["admin"]
    argv = serve_argv(docs)
    generated = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-admin")]
    head = raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]
    head_mounts = {m["name"]: m for m in head_container(docs)["volumeMounts"]}
    head_volumes = {v["name"]: v for v in head["volumes"]}
    for pool in ("prefill", "decode"):
        spec = worker_group(docs, pool)["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert not any("ADMIN" in name for name in env), "the key must not reach Ray's env"
        if not admin["drainOnStop"]:
            assert "lifecycle" not in container and "TANDEM_POD_IP" not in env
            assert "terminationGracePeriodSeconds" not in spec
            continue
        assert env["TANDEM_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        shell, flag, script = container["lifecycle"]["preStop"]["exec"]["command"]
        assert (shell, flag) == ("/bin/sh", "-c")
        words = shlex.split(script)
        key_file = "/etc/tandem/admin/admin-key"
        assert words[:2] == ["exec", "tandem"] and "TANDEM_ADMIN_KEY" not in script
        args, unknown = build_parser().parse_known_args(words[2:])
        assert unknown == [] and args.command == "drain-node"
        assert args.admin_key_file == key_file and args.tls_ca is None
        service = one(docs, "Service", FULLNAME)
        assert args.router == f"{FULLNAME}:{service['spec']['ports'][0]['port']}"
        assert args.node_ip == "$TANDEM_POD_IP" and args.if_present
        assert args.timeout_s == admin["drainTimeoutSeconds"]
        assert spec["terminationGracePeriodSeconds"] >= args.timeout_s + RPC_MARGIN_S + 10
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["admin-key"]["mountPath"] == str(Path(key_file).parent)
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret = volumes["admin-key"]["secret"]
        assert secret["items"] == [{"key": "admin-key", "path": "admin-key"}]
        assert secret["secretName"] == (admin["existingSecret"] or f"{FULLNAME}-admin")
        assert "admin-keys" not in mounts  # the router's file stays in the head pod
    if not admin["drainOnStop"]:
        assert "--admin-keys-file" not in argv and not generated
        assert "admin-keys" not in head_mounts and "admin-keys" not in head_volumes
        return
    path = Path(argv[argv.index("--admin-keys-file") + 1])
    assert head_mounts["admin-keys"]["mountPath"] == str(path.parent)
    secret = head_volumes["admin-keys"]["secret"]
    assert secret["items"] == [{"key": "admin-keys", "path": path.name}]
    if admin["existingSecret"]:
        assert secret["secretName"] == admin["existingSecret"] and not generated
        return
    (made,) = generated
    assert made["metadata"]["name"] == secret["secretName"] == f"{FULLNAME}-admin"
    keys = parse_admin_keys(base64.b64decode(made["data"]["admin-keys"]).decode(), "Secret")
    worker_key = base64.b64decode(made["data"]["admin-key"]).decode()
    assert keys.find(worker_key) is not None and len(worker_key) >= 32


ROUTER_TLS = {"tandem": {"extraArgs": ["--tls-cert", "/tls/tls.crt", "--tls-key", "/tls/tls.key"]}}


def test_a_router_serving_tls_needs_the_ca_for_the_prestop_drain() -> None:
    """Issue 22.3: the preStop drain would speak plaintext to a router serving TLS and fail at
    every pod's stop: the chart refuses that, and with router.admin.tlsCaSecret mounts the CA
    in worker pods and passes it as --tls-ca (which `tandem drain-node` parses)."""
    from cluster.cli import build_parser

    with pytest.raises(HelmError, match=r"set router.admin.tlsCaSecret"):
        render(ROUTER_TLS)
    docs = render({**ROUTER_TLS, "router": {"admin": {"tlsCaSecret": "router-ca"}}})
    for pool in ("prefill", "decode"):
        spec = worker_group(docs, pool)["template"]["spec"]
        (container,) = spec["containers"]
        words = shlex.split(container["lifecycle"]["preStop"]["exec"]["command"][2])
        args, unknown = build_parser().parse_known_args(words[2:])
        assert unknown == [] and args.tls_ca == "/etc/tandem/admin-tls/ca.crt"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["admin-tls-ca"]["mountPath"] == "/etc/tandem/admin-tls"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["admin-tls-ca"]["secret"] == {
            "secretName": "router-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]
        }  # fmt: skip
    plain = render({**ROUTER_TLS, "router": {"admin": {"drainOnStop": False}}})  # no drain
    assert "lifecycle" not in worker_group(plain, "decode")["template"]["spec"]["containers"][0]
