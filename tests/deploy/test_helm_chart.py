"""The Helm chart (deploy/helm/tandem), checked offline: helm lint, helm template with several
values sets, the RayCluster against KubeRay's CRD schema (strict about field names), core kinds
with kubernetes-validate --strict, KubeRay's own admission rules, the router's command line
against Tandem's CLI parser, and misspellings that must be caught."""

from __future__ import annotations

import copy
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

# Flags the chart passes to `tandem serve` that its parser does not have yet (the pools'
# custom Ray resources, values tandem.poolResources); see deploy/helm/tandem/values.yaml.
ASSUMED_SERVE_FLAGS = {"--prefill-resources", "--decode-resources"}

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
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VARIANTS[request.param])


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


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
    "image", "tandem", "model", "router", "router.service", "router.probes", "ray", "ray.auth",
    "ray.dashboard", "ray.head", "ray.autoscaler", "prefill", "decode", "redis", "redis.auth",
    "redis.image", "redis.external", "networkPolicy",
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
    core = [doc for doc in docs if doc["kind"] != "RayCluster"]
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
    """The head's `tandem serve` line against the real parser: only the flags the chart knowingly
    assumes may be unknown to it, and the parsed values are the chart's values."""
    from cluster.cli import build_parser

    name, docs = rendered
    args, unknown = build_parser().parse_known_args(serve_argv(docs))
    assumed = VARIANTS[name].get("tandem", {}).get("poolResources", True)
    unknown_flags = {arg for arg in unknown if arg.startswith("--")}
    assert unknown_flags <= (ASSUMED_SERVE_FLAGS if assumed else set()), unknown
    tandem = {"prefillWorkers": 1, "decodeWorkers": 1, "device": "cuda"}
    tandem |= VARIANTS[name].get("tandem", {})
    assert (args.command, args.host, args.port, args.address) == ("serve", "0.0.0.0", 50051, "auto")
    assert (args.mode, args.device) == ("disaggregated", tandem["device"])
    assert (args.prefill_workers, args.decode_workers) == (
        tandem["prefillWorkers"],
        tandem["decodeWorkers"],
    )
    assert args.model == tandem.get("model")


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
    name, docs = rendered
    head = raycluster(docs)["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    ports = {p["name"]: p["containerPort"] for p in head_container(docs)["ports"]}
    assert ports == {"gcs-server": 6379, "grpc": 50051}  # KubeRay's head Service copies these
    assert not by_kind(docs, "Ingress")
    for service in by_kind(docs, "Service"):
        if service["metadata"]["name"] == FULLNAME:
            assert [p["port"] for p in service["spec"]["ports"]] == [50051]
            assert service["spec"]["selector"] == {"ray.io/cluster": FULLNAME,
                                                   "ray.io/node-type": "head"}  # fmt: skip
        else:
            assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    if VARIANTS[name].get("networkPolicy", {}).get("enabled", True):
        ray_policy = policies[f"{FULLNAME}-ray"]
        assert ray_policy["ingress"] == [
            {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME}}}]}
        ]
        (router_rule,) = policies[f"{FULLNAME}-router"]["ingress"]
        assert router_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    else:
        assert not policies


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
    container = head_container(render())
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
    docs = render(VARIANTS[variant])
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
    assert container["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    redis_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert redis_env["REDIS_PASSWORD"] == ref
    secrets = by_kind(docs, "Secret")
    if variant == "big-gpu-pods":  # an existing Secret: the chart creates none
        assert ref == {"name": "tandem-redis", "key": "redis-password"} and not secrets
    else:
        (secret,) = secrets
        assert secret["metadata"]["name"] == ref["name"] and ref["key"] in secret["data"]


def test_no_redis_means_no_redis_url() -> None:
    docs = render(VARIANTS["no-redis-no-netpol"])
    assert "--redis-url" not in serve_argv(docs)
    assert "env" not in head_container(docs)
    assert {d["kind"] for d in docs} == {"RayCluster", "Service"}


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
