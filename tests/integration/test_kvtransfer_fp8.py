"""FP8 KV over the wire, with real pairs (TCP control + gloo channel) on CPU.

A packed (per-token scales) FP8 cache block carries its scales in its own bytes
(engine.kv_quant), so transfers ship them with the values, bit for bit, at about half a bf16
block's bytes. A per-head FP8 block is e4m3 values only; its scales stay with each worker, which
calibrated them at start-up, and the layout names them by digest. The pair's layout check
includes the KV dtype and the scale scheme: a prefill worker with an FP8 cache is refused when it
pairs with a decode worker whose cache is bf16 or fp32, and two per-head FP8 workers whose
scales differ are refused too, before any transfer. And a decode engine continuing from an FP8
prefill's transferred KV (per-head scales, the default) generates what one FP8 engine does.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from contracts.errors import KVTransferError
from kvtransfer.layout import KVLayout
from kvtransfer.pair import ReceiverEndpoint, connect_pair
from tests.integration.kvtransfer_peers import (
    HOST,
    NUM_KV_HEADS,
    NUM_LAYERS,
    TRANSPORT,
    Spec,
    kv_cache,
    layout_of,
)
from tests.integration.test_kvtransfer_protocol import (
    Peer,
    assert_clean,
    peers,
    start_receiver,
    start_sender,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_fp8_blocks_and_their_scales_arrive_bit_exact() -> None:
    specs = [Spec("one-block", 4, seed=1), Spec("odd", 13, seed=2), Spec("chunked", 26, seed=3,
             layers_per_chunk=1)]  # fmt: skip
    ids = [s.transfer_id for s in specs]
    with peers() as started:
        receiver = start_receiver(started, ids, dtype=torch.uint8)
        endpoint = receiver.receive()
        sender = start_sender(started, [endpoint], specs, dtype=torch.uint8)
        sent, received = sender.report(), receiver.report()
    assert {t: r[0] for t, r in sent.results.items()} == dict.fromkeys(ids, "completed")
    assert received.digests == sent.digests  # values and scales, byte for byte
    assert sent.metrics["bytes_sent"] == received.metrics["bytes_received"] > 0
    assert_clean(sent, received)
    fp8 = layout_of(kv_cache(1, 0, torch.uint8))
    bf16 = layout_of(kv_cache(1, 0, torch.bfloat16))
    assert fp8.head_dim == bf16.head_dim and fp8.scale_scheme == "block_tail_fp32"
    assert fp8.bytes_per_block / bf16.bytes_per_block == (fp8.head_dim + 4) / (2 * fp8.head_dim)


def _accept_in_background(endpoint: ReceiverEndpoint) -> tuple[threading.Thread, list[Any]]:
    accepted: list[Any] = []
    thread = threading.Thread(target=lambda: accepted.append(endpoint.accept(TRANSPORT)))
    thread.start()
    return thread, accepted


def _assert_pairs(endpoint: ReceiverEndpoint, address: Any, layout: KVLayout) -> None:
    """A sender of `layout` pairs with `endpoint` at `address` (over a real gloo channel)."""
    thread, accepted = _accept_in_background(endpoint)
    channel, control = connect_pair(address, "same", TRANSPORT, layout=layout)
    thread.join(30)
    assert accepted and accepted[0] is not None
    for pair_end in ((channel, control), accepted[0]):
        pair_end[1].close()
        pair_end[0].close()


@pytest.mark.parametrize("decode_dtype", [torch.bfloat16, torch.float32])
def test_an_fp8_prefill_is_refused_when_it_pairs_with_a_wider_decode(
    decode_dtype: torch.dtype,
) -> None:
    decode_layout = layout_of(kv_cache(1, 0, decode_dtype))
    prefill_layout = layout_of(kv_cache(1, 0, torch.uint8))
    endpoint = ReceiverEndpoint(HOST, layout=decode_layout)
    try:
        with pytest.raises(KVTransferError) as info:
            connect_pair(endpoint.address, "fp8/bf16", TRANSPORT, layout=prefill_layout)
        dtype_name = str(decode_dtype).removeprefix("torch.")
        assert str(info.value) == (
            "pair 'fp8/bf16' refused: the prefill (sender, tensor_parallel_size 1) and decode "
            "(receiver, tensor_parallel_size 1) KV layouts "
            f"differ: dtype float8_e4m3fn != {dtype_name}, scale_scheme block_tail_fp32 "
            "!= none; serve both with the same --kv-cache-dtype, --kv-cache-scales and model"
        )
        # refused before connecting: the receiver sees no sender at all
        assert endpoint.listener.accept(0.5) is None
        # the same endpoint pairs with a sender of its own layout, over a real gloo channel
        _assert_pairs(endpoint, endpoint.address, decode_layout)
    finally:
        endpoint.close()


@pytest.mark.parametrize("sender_layout", ["fp8", "unstated"])
def test_a_bf16_decode_refuses_an_fp8_prefill_at_pairing_time(sender_layout: str) -> None:
    """The decode (receiving) side checks the layout too: a sender that skips its own check
    (here: an address published without the layout) or states none is refused while the pair
    forms, on both ends, with the layouts named, and no channel forms."""
    from kvtransfer.pair import EndpointAddress

    decode_layout = layout_of(kv_cache(1, 0, torch.bfloat16))
    prefill_layout = layout_of(kv_cache(1, 0, torch.uint8)) if sender_layout == "fp8" else None
    endpoint = ReceiverEndpoint(HOST, layout=decode_layout)
    try:
        refused: list[BaseException] = []

        def accept() -> None:
            try:
                refused.append(AssertionError(f"formed: {endpoint.accept(TRANSPORT)}"))
            except KVTransferError as e:
                refused.append(e)

        thread = threading.Thread(target=accept)
        thread.start()
        unchecked = EndpointAddress(endpoint.address.host, endpoint.address.control_port)
        with pytest.raises(KVTransferError) as sender_error:
            connect_pair(unchecked, "fp8/bf16", TRANSPORT, layout=prefill_layout)
        thread.join(30)
        assert len(refused) == 1 and isinstance(refused[0], KVTransferError), refused
        if prefill_layout is not None:
            expected = (
                "pair 'fp8/bf16' refused by the decode (receiver) side: the prefill (sender, "
                "tensor_parallel_size 1) and decode (receiver, tensor_parallel_size 1) KV "
                "layouts differ: dtype float8_e4m3fn != bfloat16, "
                "scale_scheme block_tail_fp32 != none; serve both with the same "
                "--kv-cache-dtype, --kv-cache-scales and model"
            )
        else:
            expected = (
                "pair 'fp8/bf16' refused by the decode (receiver) side: the prefill (sender) "
                "stated no KV layout"
            )
        assert str(refused[0]) == expected
        assert str(sender_error.value) == expected
        # the endpoint still pairs with a sender of its own layout
        _assert_pairs(endpoint, unchecked, decode_layout)
    finally:
        endpoint.close()


@pytest.mark.parametrize("checked_by", ["prefill", "decode"])
def test_per_head_fp8_workers_whose_scales_differ_are_refused_at_pairing(checked_by: str) -> None:
    """Two per-head FP8 workers whose calibrated scales differ (here in one head's V scale:
    another model or weights, say) hold blocks that are not interchangeable: the pair is
    refused as it forms, by the prefill (sender) side or, when the sender skips its check (an
    address published without the layout), by the decode side, naming the scales. The decode
    endpoint still pairs with a sender holding its own scales."""
    from engine.kv_quant import scales_digest
    from kvtransfer.pair import EndpointAddress

    scales = torch.full((NUM_LAYERS, 2, NUM_KV_HEADS), 2.0**-8)  # [layers, K|V, kv heads]
    other = scales.clone()
    other[-1, 1, -1] = 2.0**-7
    cache = kv_cache(1, 0, torch.int8)
    prefill_layout = layout_of(cache, scales_digest(other))
    decode_layout = layout_of(cache, scales_digest(scales))
    assert prefill_layout.scale_scheme != decode_layout.scale_scheme
    endpoint = ReceiverEndpoint(HOST, layout=decode_layout)
    try:
        refused: list[BaseException] = []
        address = endpoint.address
        if checked_by == "decode":
            address = EndpointAddress(address.host, address.control_port)

            def accept() -> None:
                try:
                    refused.append(AssertionError(f"formed: {endpoint.accept(TRANSPORT)}"))
                except KVTransferError as e:
                    refused.append(e)

            thread = threading.Thread(target=accept)
            thread.start()
        with pytest.raises(KVTransferError) as info:
            connect_pair(address, "a/b", TRANSPORT, layout=prefill_layout)
        by = " by the decode (receiver) side" if checked_by == "decode" else ""
        assert str(info.value) == (
            f"pair 'a/b' refused{by}: the prefill (sender, tensor_parallel_size 1) and decode "
            "(receiver, tensor_parallel_size 1) KV layouts differ: scale_scheme "
            f"{prefill_layout.scale_scheme} != {decode_layout.scale_scheme}, the per-head FP8 "
            "KV scales differ (each worker calibrates them at start-up: another model, weights, "
            "code or calibration); serve both with the same --kv-cache-dtype, --kv-cache-scales "
            "and model"
        )
        if checked_by == "decode":
            thread.join(30)
            assert [str(e) for e in refused] == [str(info.value)], refused
        else:  # refused before connecting: the receiver sees no sender at all
            assert endpoint.listener.accept(0.5) is None
        _assert_pairs(endpoint, address, decode_layout)
    finally:
        endpoint.close()


def test_layouts_travel_in_offers_with_their_scale_scheme() -> None:
    from kvtransfer.codec import decode, encode
    from kvtransfer.messages import TransferOffer

    layout = layout_of(kv_cache(1, 0, torch.uint8))
    offer = TransferOffer("t", "r", layout, 5, (1, 2), 1000)
    assert decode(encode(offer)) == offer
    assert b"float8_e4m3fn/block_tail_fp32" in encode(offer)
    assert KVLayout.split_wire_dtype("bfloat16") == ("bfloat16", "none")


def test_decoding_from_an_fp8_prefills_transferred_kv_equals_one_fp8_engine() -> None:
    from tests.conftest import greedy, make_engine, prompt_ids

    lengths = {"short": 3, "block-plus-one": 5, "long": 37}
    prompts = {rid: prompt_ids(seed=n, length=n) for rid, n in lengths.items()}
    max_tokens = 10
    params = {"prompts": prompts, "max_tokens": max_tokens, "kv_cache_dtype": "fp8"}
    with peers() as started:
        decode = Peer("decode_engine", params)
        started.append(decode)
        endpoint = decode.receive()
        prefill = Peer("prefill_engine", {**params, "endpoint": endpoint})
        started.append(prefill)
        decode.conn.send(prefill.receive())
        sent, received = prefill.report(), decode.report()
    reference = make_engine(num_kv_blocks=64, block_size=4, kv_cache_dtype="fp8")
    for rid, prompt in prompts.items():
        expected = reference.generate([prompt], greedy(max_tokens=max_tokens))[0].token_ids
        assert received.results[rid][1] == ",".join(map(str, expected)), rid
    assert_clean(sent)
    assert received.integrity == "ok"
