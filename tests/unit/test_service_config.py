"""The service's configuration from code and from the command line: bad values are refused by
name; `tandem serve` flags become the autoscaling policies and worker resources they say."""

from __future__ import annotations

import pytest

from cluster.cli import build_parser, pool_config
from cluster.service import ServiceConfig


def serve_config(*argv: str) -> ServiceConfig:
    args = build_parser().parse_args(["serve", *argv])
    config = pool_config(args, 0)
    assert isinstance(config, ServiceConfig)
    return config


def test_autoscaling_flags_become_per_pool_policies() -> None:
    config = serve_config(
        "--prefill-workers", "2", "--autoscale", "--prefill-max-workers", "6",
        "--target-ttft-ms", "500", "--decode-min-workers", "1", "--decode-max-workers", "3",
        "--target-itl-ms", "30",
    )  # fmt: skip
    scaling = config.autoscaling
    assert scaling.enabled
    assert (scaling.prefill.min_workers, scaling.prefill.max_workers) == (2, 6)
    assert scaling.prefill.targets == {"queued_tokens": 8192.0, "ttft": 0.5}
    assert (scaling.decode.min_workers, scaling.decode.max_workers) == (1, 3)
    assert scaling.decode.targets == {"kv_usage": 0.8, "running": 48.0, "itl": 0.03}


def test_without_autoscale_the_pools_keep_their_sizes() -> None:
    config = serve_config("--mode", "colocated", "--workers", "3")
    assert not config.autoscaling.enabled and config.num_workers == 3
    with pytest.raises(ValueError, match="decode pool autoscaling: min_workers=0"):
        serve_config("--autoscale", "--decode-min-workers", "0")


def test_worker_resources_and_observability_flags() -> None:
    config = serve_config(
        "--prefill-resources", '{"tandem_prefill": 1}', "--metrics-port", "9464",
        "--otlp-endpoint", "collector:4317", "--http-port", "8000",
    )  # fmt: skip
    assert config.http_port == 8000
    assert serve_config().http_port is None  # the HTTP edge is off unless asked for
    assert config.prefill_resources == {"tandem_prefill": 1}
    assert config.decode_resources == {}
    assert config.metrics_port == 9464
    assert config.tracing.otlp_endpoint == "collector:4317"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"decode_resources": {"gpu_a": 0}}, "decode_resources: 'gpu_a'=0"),
        ({"cache_weight": -1.0}, "cache_weight=-1.0 must be >= 0"),
        ({"num_prefill_workers": 0}, "num_prefill_workers=0 must be an int >= 1"),
        ({"mode": "split"}, "mode='split' must be one of"),
        ({"http_port": 70000}, "http_port=70000 must be a port number"),
    ],
)
def test_bad_values_are_refused_by_name(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ServiceConfig(**fields)  # type: ignore[arg-type]


def test_engine_knobs_per_pool() -> None:
    config = serve_config(
        "--device", "cuda", "--max-num-seqs", "128", "--decode-max-num-seqs", "512",
        "--prefill-max-num-batched-tokens", "16384", "--kv-cache-memory-fraction", "0.6",
        "--decode-max-model-len", "8192",
    )  # fmt: skip
    prefill, decode = config.prefill_engine, config.engine
    assert prefill is not None and prefill.scheduler is not None
    assert decode.scheduler is not None
    assert (prefill.scheduler.max_num_seqs, prefill.scheduler.max_num_batched_tokens) == (
        128,
        16384,
    )
    assert (decode.scheduler.max_num_seqs, decode.scheduler.max_num_batched_tokens) == (512, 8192)
    assert prefill.kv_cache_memory_fraction == decode.kv_cache_memory_fraction == 0.6
    assert (prefill.max_model_len, decode.max_model_len) == (None, 8192)


def test_engine_knobs_unset_leave_sizing_to_the_device() -> None:
    config = serve_config()
    assert config.engine.scheduler is None and config.engine.max_model_len is None
    with pytest.raises(ValueError, match=r"kv_cache_memory_fraction=1\.5 must be in"):
        serve_config("--kv-cache-memory-fraction", "1.5")


def test_scheduler_defaults_are_sized_for_the_device() -> None:
    from engine.config import default_scheduler_config
    from engine.scheduler import SchedulerConfig

    assert default_scheduler_config("cpu") == SchedulerConfig()
    big = default_scheduler_config("cuda", 80 << 30)
    assert (big.max_num_seqs, big.max_num_batched_tokens) == (256, 8192)
    small = default_scheduler_config("cuda", 24 << 30)
    assert (small.max_num_seqs, small.max_num_batched_tokens) == (128, 4096)


def test_loopback_redis_and_otlp_addresses_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Workers on other nodes would look for a loopback Redis or collector on their own node."""
    from cluster.service import warn_loopback_addresses
    from prefix_cache.index import IndexConfig
    from telemetry.tracing import TracingConfig

    config = ServiceConfig(
        index=IndexConfig(redis_url="redis://127.0.0.1:6379/0"),
        tracing=TracingConfig(otlp_endpoint="localhost:4317"),
    )
    with caplog.at_level("WARNING", logger="cluster.service"):
        warn_loopback_addresses(config)
        warn_loopback_addresses(ServiceConfig(index=IndexConfig(redis_url="redis://r.svc:6379")))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert warned[0].startswith("--redis-url names 127.0.0.1, a loopback address")
    assert warned[1].startswith("--otlp-endpoint names localhost")


def test_kv_network_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtransfer.network import KVNetworkConfig

    monkeypatch.delenv("TANDEM_KV_INTERFACE", raising=False)
    monkeypatch.setenv("TANDEM_KV_PORTS", "41000-41999")
    assert serve_config().kv_network == KVNetworkConfig(None, 41000, 41999)
    flags = serve_config("--kv-interface", "eth1", "--kv-ports", "40000-40999")
    assert flags.kv_network == KVNetworkConfig("eth1", 40000, 40999)
    with pytest.raises(ValueError, match="KV ports '40000' must look like MIN-MAX"):
        serve_config("--kv-ports", "40000")


def test_disagg_flags_become_the_prefill_placement_policy() -> None:
    from router.disagg import DisaggPolicy

    assert serve_config().disagg == DisaggPolicy(mode="auto")  # auto by default
    config = serve_config(
        "--disagg", "auto", "--disagg-local-max-tokens", "64",
        "--disagg-prefill-queue-tokens", "1000", "--disagg-decode-max-load", "0.5",
        "--target-itl-ms", "40",
    )  # fmt: skip
    assert config.disagg == DisaggPolicy(
        mode="auto", local_max_tokens=64, prefill_queue_tokens=1000, decode_max_load=0.5,
        target_itl_s=0.04,
    )  # fmt: skip
    assert serve_config("--disagg", "never").disagg.mode == "never"
    with pytest.raises(ValueError, match="--disagg: local_max_tokens=-3 must be an int >= 0"):
        serve_config("--disagg-local-max-tokens", "-3")
    assert serve_config("--mode", "colocated").disagg == DisaggPolicy()
    for flags in (["--disagg", "never"], ["--disagg-decode-max-load", "0.5"]):
        with pytest.raises(ValueError, match="apply to --mode disaggregated only"):
            serve_config("--mode", "colocated", *flags)


def test_disagg_policy_in_the_service_config_is_checked() -> None:
    from router.disagg import DisaggPolicy

    with pytest.raises(ValueError, match=r"disagg=.*applies to disaggregated mode only"):
        ServiceConfig(mode="colocated", disagg=DisaggPolicy(mode="auto"))
    with pytest.raises(ValueError, match=r"disagg='auto' must be a router\.disagg\.DisaggPolicy"):
        ServiceConfig(mode="disaggregated", disagg="auto")  # type: ignore[arg-type]
    assert ServiceConfig(mode="disaggregated", disagg=DisaggPolicy(mode="never")).disagg.mode


def test_target_itl_reaches_the_decode_pools_engine_when_disaggregated() -> None:
    config = serve_config("--target-itl-ms", "40")
    assert config.engine.target_itl_s == 0.04  # the decode pool's
    assert config.prefill_engine is not None and config.prefill_engine.target_itl_s is None
    assert serve_config().engine.target_itl_s is None
    assert serve_config("--mode", "colocated", "--target-itl-ms", "40").engine.target_itl_s is None


def test_tensor_parallel_size_per_pool_and_its_worker_resources() -> None:
    from cluster.service import Service

    config = serve_config(
        "--device", "cpu", "--tensor-parallel-size", "3", "--prefill-tensor-parallel-size", "1"
    )  # fmt: skip
    assert config.prefill_engine is not None
    assert (config.prefill_engine.tensor_parallel_size, config.engine.tensor_parallel_size) == (
        1,
        3,
    )
    assert serve_config().engine.tensor_parallel_size == 1
    service = Service(config)  # one actor holds every rank's share
    assert service._resources("decode") == {"num_cpus": 3.0, "num_gpus": 0.0}
    assert service._resources("prefill") == {"num_cpus": 1.0, "num_gpus": 0.0}
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be >= 1"):
        serve_config("--decode-tensor-parallel-size", "0")


def test_only_the_disaggregated_pools_engines_transfer_kv() -> None:
    """kv_transfer (rank 0 of a private-KV TP engine keeps a transfer staging region, at the
    cost of KV blocks) is the disaggregated pools' alone: a colocated worker pays none."""
    from cluster.service import Service

    disaggregated = Service(serve_config("--device", "cpu", "--tensor-parallel-size", "2"))
    assert disaggregated._engine("prefill").kv_transfer is True
    assert disaggregated._engine("decode").kv_transfer is True
    assert disaggregated.config.engine.kv_transfer is False, "the given config is unchanged"
    colocated = Service(serve_config("--mode", "colocated", "--tensor-parallel-size", "2"))
    assert colocated._engine("decode").kv_transfer is False


def test_a_pool_whose_tensor_parallel_size_does_not_divide_the_model_is_refused_first() -> None:
    """Before the API listens or Ray starts (the default model: 9 heads, 3 KV heads)."""
    import asyncio

    from cluster.service import Service
    from contracts.errors import TensorParallelShapeError

    service = Service(serve_config("--device", "cpu", "--decode-tensor-parallel-size", "2"))
    with pytest.raises(TensorParallelShapeError) as refused:
        asyncio.run(service.start())
    assert str(refused.value) == (
        "the decode pool: tensor_parallel_size=2 does not divide the model: num_heads=9 is not "
        "a multiple of it; num_kv_heads=3 is not a multiple of it"
    )
    assert service.port is None, "nothing was started"


def test_admission_and_failover_flags() -> None:
    """Issue 22: `tandem serve` sets the admission bounds (the prompt-token one follows the
    decode pool's KV capacity unless given) and the per-request cap on migrations."""
    default = serve_config()
    assert default.admission.max_prompt_tokens is None  # from the KV capacity
    assert default.failover.max_migrations == 3
    assert default.failover.move_kv_on_drain is True
    config = serve_config(
        "--max-requests", "1000", "--max-prompt-tokens", "50000", "--max-request-bytes",
        "1048576", "--max-migrations", "0", "--no-drain-move-kv",
    )  # fmt: skip
    assert config.failover.move_kv_on_drain is False
    limits = config.admission
    assert (limits.max_requests, limits.max_prompt_tokens) == (1000, 50000)
    assert limits.max_request_bytes == 1 << 20
    assert config.failover.max_migrations == 0
    with pytest.raises(ValueError, match="--max-migrations: max_migrations=-1"):
        serve_config("--max-migrations", "-1")
    with pytest.raises(ValueError, match="admission: max_requests=0 must be an int >= 1"):
        serve_config("--max-requests", "0")
