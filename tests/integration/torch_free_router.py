"""Run by test_router_process_is_torch_free: start the real service (local Ray, the default
model) in this process, serve one gRPC request and one over the OpenAI-compatible HTTP edge, and
print as JSON whether this process (the router's) has imported torch.
Usage: python -m tests.integration.torch_free_router MODE"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request

import grpc

from cluster.service import Service, ServiceConfig
from engine.config import EngineConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc


async def serve_one(mode: str) -> dict[str, object]:
    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=256, block_size=16),
        mode=mode,
        num_workers=1,
        num_prefill_workers=1,
        num_decode_workers=1,
        port=0,
        http_port=0,
    )
    service = Service(config)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = tandem_pb2_grpc.TandemStub(channel)
            request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParameters(max_tokens=3))
            responses = [r async for r in stub.Generate(request, timeout=120)]
        body = json.dumps({"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}).encode()
        http = urllib.request.Request(
            f"http://127.0.0.1:{service.http_port}/v1/completions", body,
            {"Content-Type": "application/json"},
        )  # fmt: skip
        answer = await asyncio.to_thread(
            lambda: json.load(urllib.request.urlopen(http, timeout=120))
        )
        return {
            "num_tokens": sum(len(r.token_ids) for r in responses),
            "num_http_tokens": answer["usage"]["completion_tokens"],
            "torch_imported": "torch" in sys.modules,
        }
    finally:
        await service.stop()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(serve_one(sys.argv[1]))))
