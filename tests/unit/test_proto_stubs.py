"""The committed API stubs are exactly what proto/generate.py makes from the .proto files, they
import under the installed runtimes, and the messages round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto.generate import ROOT, generate


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate(tmp_path)
    assert fresh, "no stubs generated"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed; run python -m proto.generate"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(ROOT)} differs from its .proto; run python -m proto.generate"
        )


def test_stubs_import_and_messages_round_trip() -> None:
    from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc

    request = tandem_pb2.GenerateRequest(
        request_id="r1",
        chat=tandem_pb2.ChatInput(messages=[tandem_pb2.ChatMessage(role="user", content="hi")]),
        sampling=tandem_pb2.SamplingParameters(max_tokens=8, temperature=0.0, logit_bias={5: -1.5}),
        cache_salt="tenant-a",
    )
    decoded = tandem_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.WhichOneof("input") == "chat"
    assert decoded.sampling.HasField("temperature") and not decoded.sampling.HasField("top_p")
    assert hasattr(tandem_pb2_grpc, "TandemStub") and hasattr(tandem_pb2_grpc, "TandemServicer")
