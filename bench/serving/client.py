"""The gRPC edge of the benchmark: asks the server what it serves (ListModels) and sends one
request (Generate, server streaming), recording when it was sent, when each chunk with tokens
arrived and when the stream ended. A failed call is a record with the status code's name, never
an exception. Protobuf stays in this module. Runs on the runner's asyncio loop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from bench.serving.connection import Metadata
from bench.serving.metrics import RequestRecord
from bench.serving.runner import Completion, Send
from bench.serving.workload import Answer, Prompt
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    target: str
    model_id: str
    vocab_size: int
    max_model_len: int


async def server_info(
    channel: grpc.aio.Channel, target: str, timeout_s: float, metadata: Metadata = ()
) -> ServerInfo:
    """The first served model; raises grpc.aio.AioRpcError if the server cannot answer."""
    stub = tandem_pb2_grpc.TandemStub(channel)
    response = await stub.ListModels(
        pb.ListModelsRequest(), timeout=timeout_s, wait_for_ready=True, metadata=metadata
    )
    if not response.models:
        raise ValueError(f"the server at {target} lists no models")
    model = response.models[0]
    return ServerInfo(target, model.id, model.vocab_size, model.max_model_len)


def generate_request(
    prompt: Prompt, max_tokens: int, temperature: float, cache_salt: str, request_id: str
) -> Any:
    """A GenerateRequest for exactly `max_tokens` tokens (ignore_eos)."""
    sampling = pb.SamplingParameters(
        max_tokens=max_tokens, temperature=temperature, ignore_eos=True
    )
    request = pb.GenerateRequest(request_id=request_id, sampling=sampling, cache_salt=cache_salt)
    if prompt.token_ids:
        request.token_ids.ids.extend(prompt.token_ids)
    elif prompt.messages:
        for role, content in prompt.messages:
            request.chat.messages.add(role=role, content=content)
    else:
        request.text = prompt.text
    return request


def make_sender(
    channel: grpc.aio.Channel,
    cache_salt: str,
    temperature: float,
    timeout_s: float,
    metadata: Metadata = (),
) -> Send:
    """A Send over `channel`; requests share cached prefixes only within `cache_salt`."""
    stub = tandem_pb2_grpc.TandemStub(channel)

    async def send(index: int, label: str, prompt: Prompt, max_tokens: int) -> Completion:
        request_id = f"bench-{cache_salt}-{index}"
        request = generate_request(prompt, max_tokens, temperature, cache_salt, request_id)
        num_prompt_ids = len(prompt.token_ids)
        return await _stream(stub, request, index, label, num_prompt_ids, timeout_s, metadata)

    return send


async def _stream(
    stub: Any,
    request: Any,
    index: int,
    label: str,
    num_prompt_ids: int,
    timeout_s: float,
    metadata: Metadata,
) -> Completion:
    chunk_times: list[float] = []
    token_ids: list[int] = []
    text: list[str] = []
    last: Any = None
    error = None
    start = time.perf_counter()
    try:
        async for response in stub.Generate(request, timeout=timeout_s, metadata=metadata):
            if response.token_ids:
                chunk_times.append(time.perf_counter())
                token_ids.extend(response.token_ids)
            text.append(response.text)
            last = response
    except grpc.aio.AioRpcError as e:
        error = e.code().name
        logger.info("request %s failed: %s: %s", request.request_id, error, e.details())
    except Exception as e:  # the request boundary: one broken request must not end the run
        error = f"CLIENT_{type(e).__name__}"
        logger.warning("request %s failed in the client: %r", request.request_id, e)
    end = time.perf_counter()
    has_usage = last is not None and last.HasField("usage")
    record = RequestRecord(
        index=index,
        label=label,
        start_s=start,
        chunk_times_s=tuple(chunk_times),
        end_s=end,
        input_tokens=last.usage.prompt_tokens if has_usage else num_prompt_ids,
        output_tokens=len(token_ids),
        cached_tokens=last.usage.cached_tokens if has_usage else 0,
        error=error,
    )
    return Completion(record, Answer(tuple(token_ids), "".join(text)))
