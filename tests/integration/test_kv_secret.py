"""The KV cluster secret reaches the workers without being stored or logged by Ray: a service
that starts its own Ray cluster hands the secret to the raylet's environment (workers inherit
it), never to a runtime_env, which Ray keeps in its GCS (`ray list actors --detail` shows it
to any client of the cluster) and writes to its logs."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from tests.integration.test_service import RunningService, generate, greedy_sampling

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")


def test_the_secret_is_in_no_runtime_env_and_no_log(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.service import ServiceConfig

    canary = f"canary-{secrets.token_hex(16)}"
    monkeypatch.setenv("TANDEM_KV_SECRET", canary)
    monkeypatch.delenv("TANDEM_KV_SECRET_FILE", raising=False)
    assert not ray.is_initialized()
    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=128, block_size=16),
        mode="disaggregated", num_prefill_workers=1, num_decode_workers=1, port=0,
        cpus_per_worker=0.5,
    )  # fmt: skip
    running = RunningService(config)  # the service starts Ray: workers inherit the raylet's env
    try:
        responses = generate(running.stub, text="Hi", sampling=greedy_sampling(3))
        assert responses[-1].usage.completion_tokens == 3  # the pair formed: the secret arrived
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        actors = list(actor_table().values())  # what `ray list actors --detail` shows
        assert len(actors) >= 2
        for actor in actors:
            assert canary not in str(actor), actor.class_name
            assert 'TANDEM_KV_SECRET"' not in actor.serialized_runtime_env
    finally:
        running.close()
    leaks = [
        path
        for path in (session / "logs").rglob("*")
        if path.is_file() and canary.encode() in path.read_bytes()
    ]
    assert leaks == []


def actor_table() -> dict[Any, Any]:
    """The GCS's actor records (ActorTableData, runtime_env included), through the driver's
    own GCS client: the state API would need the dashboard."""
    gcs = ray._private.worker.global_worker.gcs_client

    async def get() -> dict[Any, Any]:
        return await gcs.async_get_all_actor_info()  # type: ignore[no-any-return]

    return asyncio.run(get())


def test_a_made_up_secret_is_in_the_environment_only_while_ray_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cluster.service import kv_secret_inherited, kv_secret_runtime_env

    monkeypatch.delenv("TANDEM_KV_SECRET", raising=False)
    monkeypatch.delenv("TANDEM_KV_SECRET_FILE", raising=False)
    with kv_secret_inherited(local=True):
        made_up = os.environ["TANDEM_KV_SECRET"]
        assert len(made_up) == 64
    assert "TANDEM_KV_SECRET" not in os.environ
    with kv_secret_inherited(local=False):  # a joined cluster: the nodes bring their own
        assert "TANDEM_KV_SECRET" not in os.environ
    assert kv_secret_runtime_env() == {}
    path = tmp_path / "secret"
    monkeypatch.setenv("TANDEM_KV_SECRET_FILE", str(path))
    with kv_secret_inherited(local=True):
        assert "TANDEM_KV_SECRET" not in os.environ
    assert kv_secret_runtime_env() == {"env_vars": {"TANDEM_KV_SECRET_FILE": str(path)}}
