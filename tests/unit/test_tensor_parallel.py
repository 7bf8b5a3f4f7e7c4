"""Tensor parallelism inside one engine (engine.parallel, engine.sharding): layouts and weight
cuts in-process, then real follower processes over gloo on the CPU: greedy output equal to a
single rank, clean shutdown, a killed rank and a stopped rank failing rank 0 cleanly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from contracts.errors import InvalidRequest, RankFailed, TensorParallelShapeError
from contracts.outputs import TokenLogprobs
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import NAMED_SHAPES, ModelConfig
from engine.parallel import decode_plan, encode_plan
from engine.sharding import check_divisible, shard_layout, shard_weights
from tests.conftest import greedy, make_engine, prompt_ids

TINY = "dummy:tiny"  # 4 heads, 2 KV heads, MLP 128, vocabulary 512
PROMPTS = [prompt_ids(1, 23), prompt_ids(2, 5), prompt_ids(3, 9)]  # 23 > one 8-token chunk


def _tokens(engine: Engine, max_tokens: int = 6) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(PROMPTS, greedy(max_tokens))]


@pytest.fixture(scope="module")
def single_rank_tokens() -> list[list[int]]:
    return _tokens(make_engine(TINY, max_prefill_chunk_tokens=8))


# ---- layouts and weights (no processes) ---------------------------------------------------


def test_layout_replicates_kv_heads_when_fewer_than_ranks() -> None:
    config = NAMED_SHAPES["tiny"]
    layouts = [shard_layout(config, 4, rank) for rank in range(4)]
    assert [(s.head_start, s.num_heads) for s in layouts] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    # query head h reads KV head h // 2: ranks 0, 1 share KV head 0; ranks 2, 3 KV head 1
    assert [(s.kv_head_start, s.num_kv_heads) for s in layouts] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert layouts[3].local_config(config).num_kv_heads == 1


def test_layout_of_the_default_model_at_three_ranks() -> None:
    config = NAMED_SHAPES["smollm2-135m"]  # 9 heads, 3 KV heads, MLP 1536, vocab 49152
    layout = shard_layout(config, 3, 2)
    assert (layout.head_start, layout.num_heads) == (6, 3)
    assert (layout.kv_head_start, layout.num_kv_heads) == (2, 1)
    assert (layout.intermediate_start, layout.intermediate_size) == (1024, 512)
    assert (layout.vocab_start, layout.vocab_shard_size) == (32768, 16384)


@pytest.mark.parametrize(
    ("shape", "size", "named"),
    [
        ("smollm2-135m", 2, ["tensor_parallel_size=2", "num_heads=9", "num_kv_heads=3"]),
        ("llama-3-8b", 3, ["num_heads=32", "num_kv_heads=8", "intermediate_size=14336"]),
        ("tiny", 8, ["num_heads=4"]),
    ],
)
def test_shapes_that_do_not_divide_are_refused_naming_the_sizes(
    shape: str, size: int, named: list[str]
) -> None:
    with pytest.raises(TensorParallelShapeError) as error:
        check_divisible(NAMED_SHAPES[shape], size)
    for text in named:
        assert text in str(error.value)


def test_engine_refuses_a_non_dividing_shape_at_start_up() -> None:
    with pytest.raises(TensorParallelShapeError, match=r"tensor_parallel_size=3 .*num_heads=4"):
        make_engine(TINY, tensor_parallel_size=3)


def test_shard_weights_cuts_rows_columns_and_pads_the_vocabulary() -> None:
    config = ModelConfig(9, 4, 6, 1, 2, 1, head_dim=2, max_position_embeddings=8)
    full = {
        "model.embed_tokens.weight": torch.arange(36.0).view(9, 4),
        "model.layers.0.self_attn.q_proj.weight": torch.arange(16.0).view(4, 4),
        "model.layers.0.self_attn.q_proj.weight_scale": torch.arange(4.0),
        "model.layers.0.self_attn.k_proj.weight_scale": torch.tensor(0.5),
        "model.layers.0.self_attn.o_proj.weight": torch.arange(16.0).view(4, 4),
        "model.layers.0.self_attn.o_proj.weight_scale": torch.arange(4.0),
        "model.layers.0.mlp.down_proj.weight": torch.arange(24.0).view(4, 6),
        "model.norm.weight": torch.ones(4),
    }
    cut = shard_weights(dict(full), shard_layout(config, 2, 1))  # rank 1 of 2
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    assert torch.equal(cut[f"{attn}.q_proj.weight"], full[f"{attn}.q_proj.weight"][2:])
    assert torch.equal(cut[f"{attn}.q_proj.weight_scale"], torch.tensor([2.0, 3]))  # per row
    assert cut[f"{attn}.k_proj.weight_scale"].item() == 0.5  # per tensor
    assert torch.equal(cut[f"{attn}.o_proj.weight"], full[f"{attn}.o_proj.weight"][:, 2:])
    assert torch.equal(cut[f"{attn}.o_proj.weight_scale"], torch.arange(4.0))  # output: whole
    assert torch.equal(cut[f"{mlp}.down_proj.weight"], full[f"{mlp}.down_proj.weight"][:, 3:])
    assert torch.equal(cut["model.norm.weight"], torch.ones(4))
    embedding = cut["model.embed_tokens.weight"]  # vocabulary rows [5, 10) of 9: one padding
    assert torch.equal(embedding[:4], full["model.embed_tokens.weight"][5:])
    assert embedding.shape == (5, 4) and not embedding[4].any()


def test_plan_round_trip_runs_the_same_step() -> None:
    """A follower's rebuilt step computes the same logits as rank 0's, on a step mixing
    decodes with a prefill chunk."""
    engine = make_engine(TINY, max_prefill_chunk_tokens=8)
    engine.add_request("a", None, greedy(4), prompt_token_ids=PROMPTS[1])
    engine.step()
    engine.add_request("b", None, greedy(4), prompt_token_ids=PROMPTS[0])
    scheduled = engine.scheduler.schedule()
    assert sorted(s.num_new_tokens for s in scheduled.scheduled) == [1, 8]
    rebuilt = decode_plan(encode_plan(scheduled))
    expected = engine.runner.execute(scheduled)
    assert torch.equal(engine.runner.execute(rebuilt), expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tensor_parallel_one_device": 1, "cuda_graphs": False}, r"=1 must be a bool"),
        ({"tensor_parallel_one_device": True}, r"=True needs cuda_graphs=False"),
    ],
)
def test_the_one_device_switch_is_a_bool_and_refuses_cuda_graphs(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=rf"^tensor_parallel_one_device{message}"):
        EngineConfig(**fields)  # type: ignore[arg-type]


def test_followers_get_the_one_device_switch() -> None:
    """Followers rebuild rank 0's config from JSON: the switch (same GPU, gloo) reaches them."""
    from engine.parallel import _config_from_json, _config_json

    config = EngineConfig(
        tensor_parallel_size=2, tensor_parallel_one_device=True, cuda_graphs=False
    )
    assert _config_from_json(_config_json(config)) == config


def test_a_single_rank_engine_creates_no_process_group() -> None:
    engine = make_engine(TINY)
    assert engine.tp is None and engine.model.tp is None


# ---- real ranks over gloo -----------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 4])
def test_greedy_output_equals_a_single_rank(size: int, single_rank_tokens: list) -> None:
    with make_engine(TINY, max_prefill_chunk_tokens=8, tensor_parallel_size=size) as engine:
        assert engine.model.config.num_heads == 4 // size
        assert engine.runner.kv_cache.shape[-2] == 1  # this rank's KV head only
        assert _tokens(engine) == single_rank_tokens
        assert _tokens(engine) == single_rank_tokens  # again, from the prefix cache
        engine.check_integrity()
        if size == 2:  # KV heads split: the ranks share one cache, KV transfer sees it whole
            _check_shared_cache(engine)
        else:  # KV heads replicated: nothing shared, and no staging region (no kv_transfer)
            _check_private_cache(engine)
        assert engine.tp is not None and engine.tp.followers is not None
        processes = engine.tp.followers.processes
    assert [p.returncode for p in processes] == [0] * (size - 1)  # stopped cleanly


def _check_shared_cache(engine: Engine) -> None:
    """The whole cache holds what a single rank's would, every head in its place (rank 1's
    written by its own process), and rank 0's cache is its first head's slice of it."""
    assert engine.tp is not None
    whole = engine.transfer_kv_cache  # [layers, 2, blocks, block_size, 2 KV heads, head_dim]
    assert whole.shape[4] == 2 and whole.shape[:4] == engine.runner.kv_cache.shape[:4]
    assert engine.runner.kv_cache.data_ptr() == whole.data_ptr()
    with make_engine(TINY, max_prefill_chunk_tokens=8) as single:  # the same steps, one rank
        _tokens(single)
        _tokens(single)
        assert whole[..., 1, :].abs().sum() > 0
        torch.testing.assert_close(whole, single.runner.kv_cache, atol=1e-5, rtol=1e-4)
    path = engine.tp.store.get("kv-cache").decode()
    assert not os.path.exists(path), "the shared cache's file is unlinked once mapped"


def _check_private_cache(engine: Engine) -> None:
    """Each rank holds its own cache; an engine that transfers no KV (no kv_transfer) keeps no
    transfer staging region and refuses to give one (test_tensor_parallel_kv has the engines
    that do)."""
    assert engine.tp is not None
    assert engine.runner.kv_cache.is_contiguous()
    assert engine.tp.whole_kv_cache is None
    with pytest.raises(InvalidRequest, match=r"^kv_transfer: .*kv_transfer=True"):
        engine.transfer_kv_cache  # noqa: B018
    assert not engine.tp.store.check(["kv-cache"]), "no cache is shared"


def test_fp8_weights_shard_with_their_scales() -> None:
    """FP8 at TP=2 is not bit-equal to FP8 at TP=1 (row-parallel inputs are quantized per
    rank's slice), but its first tokens and their logprobs agree."""
    single = _first_tokens(make_engine(TINY, quantization="fp8"))
    with make_engine(TINY, quantization="fp8", tensor_parallel_size=2) as engine:
        split = _first_tokens(engine)
    assert [t.token_id for t in split] == [t.token_id for t in single]
    assert all(abs(a.logprob - b.logprob) < 0.05 for a, b in zip(single, split, strict=True))


def _first_tokens(engine: Engine) -> list[TokenLogprobs]:
    """The first sampled token of each prompt, with its logprob."""
    for n, prompt in enumerate(PROMPTS):
        engine.add_request(f"first-{n}", None, greedy(1, logprobs=1), prompt_token_ids=prompt)
    firsts = {}
    while engine.has_unfinished_requests():
        firsts |= {o.request_id: o.logprobs[0] for o in engine.step()}
    return [firsts[f"first-{n}"] for n in range(len(PROMPTS))]


def test_a_killed_rank_fails_rank_zero_with_a_clear_error() -> None:
    timeout_s = 60.0
    engine = make_engine(TINY, tensor_parallel_size=2, tensor_parallel_timeout_s=timeout_s)
    try:
        assert engine.tp is not None and engine.tp.followers is not None
        follower = engine.tp.followers.processes[0]
        engine.add_request("r", None, greedy(8), prompt_token_ids=PROMPTS[0])
        engine.step()
        follower.kill()
        follower.wait()
        started = time.monotonic()
        with pytest.raises(RankFailed, match=rf"rank 1 \(pid {follower.pid}\) exited with code -9"):
            while engine.has_unfinished_requests():
                engine.step()
        # seen from the closed connection, not by waiting out the collective timeout
        assert time.monotonic() - started < timeout_s / 2
        with pytest.raises(RankFailed):  # the engine stays failed
            engine.step()
        engine.abort_request("r")
        engine.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    finally:
        engine.close()


def test_a_stopped_rank_fails_rank_zero_after_the_timeout() -> None:
    engine = make_engine(TINY, tensor_parallel_size=2, tensor_parallel_timeout_s=2.0)
    try:
        assert engine.tp is not None and engine.tp.followers is not None
        follower = engine.tp.followers.processes[0]
        engine.add_request("r", None, greedy(4), prompt_token_ids=PROMPTS[1])
        os.kill(follower.pid, signal.SIGSTOP)
        with pytest.raises(RankFailed, match="timed out"):
            while engine.has_unfinished_requests():
                engine.step()
        assert follower.wait(timeout=10) == -signal.SIGKILL  # rank 0 took the worker down
        engine.abort_request("r")
        engine.check_integrity()
    finally:
        engine.close()


def test_a_shared_cache_that_does_not_fit_its_folder_is_refused_naming_both_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.parallel import _new_share_file

    monkeypatch.setenv("TANDEM_TP_SHARE_DIR", str(tmp_path))
    with pytest.raises(RankFailed, match=rf"needs {1 << 60} bytes; {tmp_path} has \d+ free"):
        _new_share_file(1 << 60)
    path = _new_share_file(4096)  # sparse, of the size asked
    assert os.path.getsize(path) == 4096 and os.path.dirname(path) == str(tmp_path)
