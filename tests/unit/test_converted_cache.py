"""The converted-model cache (engine.loader.converted): a repeated GGUF load reads the stored
conversion instead of parsing and dequantizing the file, gives the same model, and falls back
to converting again whenever the entry is missing, stale, damaged or cannot be written."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import converted, gguf_file
from engine.model_runner import zeros_on_demand
from tests.unit.test_gguf_loading import convert_to_gguf
from tests.unit.test_model_parity import build_hf_model

pytest.importorskip("transformers")


@pytest.fixture
def gguf_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    convert_to_gguf(build_hf_model(tmp_path / "hf", "gqa"), path, GGMLQuantizationType.Q8_0)
    return path


def load(path: Path, **kwargs: object) -> Engine:
    return Engine(EngineConfig(model=str(path), device="cpu", num_kv_blocks=16, **kwargs))


def parameters(engine: Engine) -> dict[str, torch.Tensor]:
    """Every weight, unpacked: the dense weights are dropped once packed for oneDNN."""
    out = {}
    for name, module in engine.model.named_modules():
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            probe = torch.eye(module.in_features)  # type: ignore[arg-type]
            out[f"{name}.weight"] = module(probe).T - (
                0 if module.bias is None else module.bias[:, None]
            )
    for name, param in engine.model.named_parameters():
        if param.numel():
            out[name] = param.detach()
    return out


def test_a_repeated_load_reads_the_stored_conversion(
    gguf_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load(gguf_path)
    entry = converted.entry_dir(gguf_path)
    assert sorted(p.name for p in entry.iterdir()) == [
        "metadata.json", "weights-float32.bin", "weights-float32.json"
    ]  # fmt: skip

    def parse(path: Path) -> object:
        raise AssertionError(f"{path} was parsed again")

    monkeypatch.setattr(gguf_file, "open_gguf", parse)
    second = load(gguf_path)
    assert second.model_config == first.model_config
    assert second.tokenizer is not None and first.tokenizer is not None
    assert second.tokenizer.encode("the cat") == first.tokenizer.encode("the cat")
    expected, got = parameters(first), parameters(second)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_an_edited_file_is_converted_again(gguf_path: Path) -> None:
    load(gguf_path)
    before = converted.entry_dir(gguf_path)
    stat = gguf_path.stat()
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = converted.entry_dir(gguf_path)
    assert after != before and not after.exists()
    load(gguf_path)
    assert (after / "weights-float32.bin").is_file()


@pytest.mark.parametrize("damage", ["truncate", "index"])
def test_a_damaged_entry_is_converted_again(gguf_path: Path, damage: str) -> None:
    reference = parameters(load(gguf_path))
    entry = converted.entry_dir(gguf_path)
    data = entry / "weights-float32.bin"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:1000])
    else:
        (entry / "weights-float32.json").write_text('{"version": 1, "parameters": []}')
    reloaded = parameters(load(gguf_path))
    for name, tensor in reference.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert data.stat().st_size > 1000, "the entry was written again"


def test_an_unwritable_cache_only_warns(
    tmp_path: Path,
    gguf_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(blocked))
    with caplog.at_level(logging.WARNING, logger="engine.loader.converted"):
        engine = load(gguf_path)
    assert engine.model_config.num_layers == 2
    assert "could not cache the converted" in caplog.text


def test_the_cache_can_be_turned_off(gguf_path: Path) -> None:
    load(gguf_path, converted_cache=False)
    assert not converted.entry_dir(gguf_path).exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zeros_on_demand_are_zeros(dtype: torch.dtype) -> None:
    shape = (3, 2, 257, 4, 8)
    tensor = zeros_on_demand(shape, dtype, torch.device("cpu"))
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    assert not tensor.any()
    tensor[1, 1, 7] = 1.5
    assert tensor.sum().item() == 1.5 * 32
