"""Loading GGUF files: config, tokenizer and (de)quantized weights, checked against transformers.

Each test writes its own GGUF with `gguf.GGUFWriter` the way llama.cpp's converter does: tensors
renamed to GGUF names, Q and K rows permuted for interleaved rotary embedding, matrices stored
as F32, F16, Q8_0, Q4_0 or Q4_1 and 1-D norm weights as F32, plus a tiny byte-level BPE
tokenizer. The weights come from a tiny transformers Llama whose parameters are then replaced
by the dequantized ones, so Tandem's logits must equal the reference up to fp32 rounding.

The reference dequantizes in Hugging Face row order: the rotary permutation only reorders rows
and quantization blocks never cross a row, so quantizing commutes with the permutation. That
keeps Tandem's own un-permutation out of the reference.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from tokenizers import pre_tokenizers

from contracts.errors import ModelLoadError, UnsupportedModel
from contracts.sampling_params import SamplingParams
from engine.loader import describe_model, resolve_model
from engine.loader.gguf_file import _GLOBAL_TENSORS, _LAYER_TENSORS
from tests.conftest import make_engine, prompt_ids
from tests.unit.test_model_parity import (
    ATOL,
    RTOL,
    build_hf_model,
    decode_logits,
    hf_logits,
    prefill_logits,
)

pytest.importorskip("transformers")

Q = GGMLQuantizationType
QUANT_TYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
END_OF_TEXT = "<|endoftext|>"
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3
LETTER_PAIRS = ("th", "he", "in", "er", "an", "on", "re", "at", "en", "or", "es", "te", "ar")
LETTER_PAIRS += ("st", "is", "ou", "ed")

_GGUF_GLOBAL = {hf: ours for ours, hf in _GLOBAL_TENSORS.items()}  # inverted: HF -> GGUF
_GGUF_LAYER = {hf: ours for ours, hf in _LAYER_TENSORS.items()}


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """Tokens and merges of a GPT-2 style byte-level BPE vocabulary of exactly 300 entries:
    <|endoftext|>, the 256 byte symbols, then 43 merges (space+letter, common letter pairs)."""
    merges = [f"Ġ {c}" for c in string.ascii_lowercase] + [f"{p[0]} {p[1]}" for p in LETTER_PAIRS]
    tokens = [
        END_OF_TEXT,
        *sorted(pre_tokenizers.ByteLevel.alphabet()),
        *(m.replace(" ", "") for m in merges),
    ]
    assert len(set(tokens)) == len(tokens) == 300
    return tokens, merges


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.rest
    return f"blk.{layer}.{_GGUF_LAYER[rest]}"


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `permute` of a Q or K projection (convert_hf_to_gguf.py)."""
    rows, cols = weight.shape
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, cols)
        .swapaxes(1, 2)
        .reshape(rows, cols)
    )


def rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = config.rope_parameters["rope_theta"]
    return float(theta)


def llama_metadata(config: Any) -> dict[str, int | float | str]:
    """The `llama.*` keys llama.cpp writes for a transformers LlamaConfig."""
    return {
        "llama.block_count": config.num_hidden_layers,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.freq_base": rope_theta(config),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
    }


def write_gguf(
    path: Path,
    metadata: dict[str, int | float | str],
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
    arch: str = "llama",
) -> Path:
    """A GGUF file with `metadata` (ints as uint32, floats as float32), the byte-level
    tokenizer, and `tensors` (GGUF name -> (float32 array, storage type))."""
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    tokens, merges = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [TOKEN_TYPE_CONTROL if t == END_OF_TEXT else TOKEN_TYPE_NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(END_OF_TEXT))
    writer.add_eos_token_id(tokens.index(END_OF_TEXT))
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def convert_to_gguf(
    model: torch.nn.Module, path: Path, qtype: GGMLQuantizationType
) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """Write `model` as llama.cpp would, then give it the dequantized weights (in place).

    Tied models have no `lm_head` among their parameters, so no `output.weight` is written.
    Returns the tensors written (GGUF name -> (stored array before quantization, type)).
    """
    config = model.config
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            weight = param.detach().float().numpy()
            tensor_type = qtype if weight.ndim == 2 else Q.F32  # norms stay F32
            stored = weight
            if name.endswith("q_proj.weight"):
                stored = llama_cpp_permute(weight, config.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                stored = llama_cpp_permute(weight, config.num_key_value_heads)
            tensors[gguf_name(name)] = (np.ascontiguousarray(stored), tensor_type)
            dequantized = quants.dequantize(quants.quantize(weight, tensor_type), tensor_type)
            param.copy_(torch.from_numpy(dequantized.astype(np.float32)))
    write_gguf(path, llama_metadata(config), tensors)
    return tensors


@pytest.fixture
def gguf_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "gguf"
    directory.mkdir()
    return directory


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_logits_match_dequantized_transformers(
    tmp_path: Path, gguf_dir: Path, qtype: GGMLQuantizationType
) -> None:
    reference = build_hf_model(tmp_path / "hf", "gqa")
    original_q = reference.model.layers[0].self_attn.q_proj.weight.detach().clone()
    written = convert_to_gguf(reference, gguf_dir / "tiny.gguf", qtype)
    dequantized_q = reference.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(original_q, dequantized_q) == (qtype == Q.F32)

    # The file holds what we meant: matrices in `qtype`, norms F32, Q rows permuted.
    reader = GGUFReader(str(gguf_dir / "tiny.gguf"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types == {name: tensor_type for name, (_, tensor_type) in written.items()}
    assert types["output.weight"] == qtype and types["blk.1.attn_norm.weight"] == Q.F32
    stored_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored_q = quants.dequantize(stored_q.data, qtype)
    assert not np.array_equal(stored_q, dequantized_q.numpy())
    np.testing.assert_array_equal(stored_q, llama_cpp_permute(dequantized_q.numpy(), 4))

    engine = make_engine(str(gguf_dir / "tiny.gguf"), num_kv_blocks=64, block_size=4)
    token_ids = prompt_ids(seed=4, length=29, vocab_size=300)
    expected = hf_logits(reference, token_ids)
    torch.testing.assert_close(prefill_logits(engine, token_ids), expected, atol=ATOL, rtol=RTOL)
    decoded = decode_logits(engine, token_ids, num_prefix=11)
    torch.testing.assert_close(decoded, expected[10:], atol=ATOL, rtol=RTOL)
    engine.check_integrity()


def test_config_and_tokenizer_come_from_metadata(tmp_path: Path, gguf_dir: Path) -> None:
    reference = build_hf_model(tmp_path / "hf", "gqa")
    path = gguf_dir / "tiny-q8.gguf"
    convert_to_gguf(reference, path, Q.Q8_0)
    source = resolve_model(str(path))
    assert (source.kind, source.model_id) == ("gguf", "tiny-q8")
    info, _ = describe_model(source)
    config = info.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (300, 64, 96)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (2, 4, 2)
    assert config.head_dim == 16 and config.num_queries_per_kv == 2
    assert config.max_position_embeddings == 256
    assert config.rope_theta == pytest.approx(rope_theta(reference.config))
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert not config.tie_word_embeddings  # output.weight is in the file
    assert not config.attention_bias
    assert config.rope_scaling is None

    tokenizer = info.tokenizer
    assert tokenizer is not None
    assert tokenizer.vocab_size == 300
    assert tokenizer.eos_token_ids == frozenset({0}) and tokenizer.bos_token_id == 0
    assert tokenizer.is_special(0) and not tokenizer.is_special(1)
    text = "the cat sat on the mat, then ate 3 eggs. café ☕"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.id_to_token(i) for i in tokenizer.encode(" cat the")]
    assert pieces == ["Ġc", "at", "Ġt", "he"]
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    assert tokenizer.encode(f"a{END_OF_TEXT}b") == [*a, 0, *b]

    # A text prompt runs end to end, greedily, to the same tokens as the reference.
    engine = make_engine(str(path), num_kv_blocks=64, block_size=4)
    prompt = "the cat sat on"
    out = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([tokenizer.encode(prompt)]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(tokenizer.encode(prompt)) :].tolist()
    assert out.token_ids == expected
    assert out.text == tokenizer.decode(expected)
    engine.check_integrity()


def test_file_without_output_weight_ties_embeddings(tmp_path: Path, gguf_dir: Path) -> None:
    reference = build_hf_model(tmp_path / "hf", "mha-tied")
    written = convert_to_gguf(reference, gguf_dir / "tied.gguf", Q.Q4_1)
    assert "output.weight" not in written
    engine = make_engine(str(gguf_dir / "tied.gguf"), num_kv_blocks=64, block_size=4)
    assert engine.model_config.tie_word_embeddings
    assert engine.model_config.num_heads == engine.model_config.num_kv_heads == 4
    token_ids = prompt_ids(seed=5, length=21, vocab_size=300)
    torch.testing.assert_close(
        prefill_logits(engine, token_ids), hf_logits(reference, token_ids), atol=ATOL, rtol=RTOL
    )
    engine.check_integrity()


def small_tensors() -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    return {"token_embd.weight": (np.zeros((300, 32), dtype=np.float32), Q.F32)}


def test_unsupported_architecture_is_named(gguf_dir: Path) -> None:
    path = write_gguf(
        gguf_dir / "gpt2.gguf",
        {"gpt2.block_count": 1, "gpt2.context_length": 64, "gpt2.embedding_length": 32},
        small_tensors(),
        arch="gpt2",
    )
    with pytest.raises(UnsupportedModel, match="'gpt2'") as excinfo:
        make_engine(str(path))
    assert "llama" in str(excinfo.value)  # says what is supported


def test_missing_metadata_key_is_named(tmp_path: Path, gguf_dir: Path) -> None:
    reference = build_hf_model(tmp_path / "hf", "gqa")
    metadata = llama_metadata(reference.config)
    del metadata["llama.block_count"]
    path = write_gguf(gguf_dir / "no-blocks.gguf", metadata, small_tensors())
    with pytest.raises(ModelLoadError, match=r"llama\.block_count") as excinfo:
        make_engine(str(path))
    assert not isinstance(excinfo.value, UnsupportedModel)
