"""A client run inside a test namespace (`ip netns exec ... python -m
tests.integration.netns_client ...`): the test process itself stays in the root namespace,
which cannot reach the test network. Prints one JSON line.

    wait TARGET TIMEOUT_S               poll gRPC health until SERVING
    generate TARGET PROMPT MAX_TOKENS   greedy: {"token_ids": [...], "text": "..."}
    metrics URL                         {"text": the Prometheus exposition}
    streams TARGET MAX_TOKENS PROMPT... greedy streams at once: prints {"started": N} once each
                                        has its first tokens, then {"token_ids": [[...], ...]}
    workers GCS_ADDRESS                 every live Tandem worker actor of the Ray cluster, each
                                        checked (check_integrity, no block held): {"workers":
                                        [{"class": ..., "ip": ..., "blocks_held": ...}, ...],
                                        "nodes": [{"ip": ..., "alive": ..., "death": ...}]}
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

import grpc


def wait(target: str, timeout_s: float) -> dict[str, object]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    status = "not answering"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as e:
                status = e.code().name
            if status == "SERVING":
                return {"status": status}
            time.sleep(0.2)
    raise SystemExit(f"{target} not SERVING within {timeout_s} s: {status}")


def generate(target: str, prompt: str, max_tokens: int) -> dict[str, object]:
    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    sampling = pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    with grpc.insecure_channel(target) as channel:
        stub = tandem_pb2_grpc.TandemStub(channel)
        responses = list(stub.Generate(pb.GenerateRequest(text=prompt, sampling=sampling),
                                       timeout=120))  # fmt: skip
    return {
        "token_ids": [t for r in responses for t in r.token_ids],
        "text": "".join(r.text for r in responses),
    }


def streams(target: str, max_tokens: int, prompts: list[str]) -> dict[str, object]:
    """Greedy streams of `prompts` at once; prints {"started": N} (flushed) once every stream
    has its first two responses, and returns each stream's token ids."""
    import threading

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    sampling = pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = threading.Barrier(len(prompts) + 1)
    results: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def run(index: int, stub: object) -> None:
        call = stub.Generate(pb.GenerateRequest(text=prompts[index], sampling=sampling),  # type: ignore[attr-defined]
                             timeout=600)  # fmt: skip
        try:
            for number, response in enumerate(call):
                results[index] += response.token_ids
                if number == 1:
                    started.wait(120)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            started.abort()

    with grpc.insecure_channel(target) as channel:
        stub = tandem_pb2_grpc.TandemStub(channel)
        threads = [threading.Thread(target=run, args=(i, stub)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        started.wait(300)
        print(json.dumps({"started": len(prompts)}), flush=True)
        for thread in threads:
            thread.join(600)
    if errors:
        raise SystemExit(f"a stream failed: {errors[0]!r}")
    return {"token_ids": results}


def workers(gcs_address: str) -> dict[str, object]:
    """Joins the Ray cluster as a driver, finds every live Tandem worker actor (named in the
    "tandem" namespace, cluster.service) and checks each: check_integrity, its blocks free."""
    import ray
    from ray._private.state import actors

    ray.init(address=gcs_address, log_to_driver=False, logging_level="ERROR")
    found = []
    for info in actors().values():
        if info["State"] != "ALIVE" or info["ActorClassName"] not in (
            "EngineWorker",
            "PrefillWorker",
        ):
            continue
        handle = ray.get_actor(info["Name"], namespace="tandem")
        ray.get(handle.check_integrity.remote(), timeout=60)
        stats = ray.get(handle.stats.remote(), timeout=60)
        found.append({
            "class": info["ActorClassName"], "ip": info["Address"]["IPAddress"],
            "blocks_held": stats.num_blocks - stats.num_free_blocks,
            "requests": stats.num_requests,
        })  # fmt: skip
    nodes = [
        {"ip": n["NodeManagerAddress"], "alive": n["Alive"], "death": n["DeathReasonMessage"]}
        for n in ray.nodes()
    ]
    ray.shutdown()
    return {"workers": found, "nodes": nodes}


def metrics(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return {"text": reply.read().decode()}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "wait":
        result = wait(args[0], float(args[1]))
    elif command == "generate":
        result = generate(args[0], args[1], int(args[2]))
    elif command == "metrics":
        result = metrics(args[0])
    elif command == "streams":
        result = streams(args[0], int(args[1]), args[2:])
    elif command == "workers":
        result = workers(args[0])
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
