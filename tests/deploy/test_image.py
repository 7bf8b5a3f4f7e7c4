"""The container image's build context: every package of the project goes into it (a package
missing from Dockerfile.dockerignore's allow-list builds an image that cannot import it)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"


def test_every_package_is_in_the_build_context() -> None:
    allowed = {
        line[1:].strip().rstrip("/")
        for line in IGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= allowed, f"add to {IGNORE.name}: {sorted(packages - allowed)}"
    assert {"pyproject.toml", "README.md"} <= allowed
