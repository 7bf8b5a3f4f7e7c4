"""Regenerate the Python stubs of the API from the .proto files (committed; CI checks that this
reproduces them byte for byte):

    python -m proto.generate

Uses grpcio-tools 1.84 (the test extras pin it): stubs it writes import under grpcio >= 1.84
and the protobuf runtimes we support (6.x and 7.x), including the GPU machines' versions.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("proto/tandem/v1/tandem.proto", "proto/tandem/v1/admin.proto")


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Write the stubs of every API proto under `out_dir` (mirroring proto/); their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(ROOT / proto),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} with exit code {code}")
    return sorted(
        path
        for proto in PROTOS
        for path in (out_dir / proto).parent.glob(Path(proto).stem + "_pb2*")
    )


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)
