"""A client run inside a test namespace (`ip netns exec ... python -m
tests.integration.netns_client ...`): the test process itself stays in the root namespace,
which cannot reach the test network. Prints one JSON line.

    wait TARGET TIMEOUT_S               poll gRPC health until SERVING
    generate TARGET PROMPT MAX_TOKENS   greedy: {"token_ids": [...], "text": "..."}
    metrics URL                         {"text": the Prometheus exposition}
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
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
