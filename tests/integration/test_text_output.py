"""What callers see of generated text, with the real default model (SmolLM2-135M-Instruct).

Stop strings (cut out of the text, never streamed, even when they span tokens or start inside
one), streamed deltas that add up to the final text and never hold half a UTF-8 character,
special tokens, logprobs checked against the model's own logits, and seeded sampling.
"""

from __future__ import annotations

import pytest
import torch

from contracts.outputs import FinishReason, RequestOutput
from contracts.sampling_params import SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.engine import Completion, Engine
from tests.unit.test_model_parity import prefill_logits

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
# The model answers "Café " and then emoji, each written as three byte-level tokens.
NON_ASCII_REQUEST = "Repeat exactly: café ☕ 😀"
NON_ASCII_TEXT = "Café ☕ crème brûlée 😀🎉 日本語 naïve 👩‍👩‍👧"


@pytest.fixture(scope="module")
def engine(default_model_engine: Engine) -> Engine:
    return default_model_engine


def chat_ids(engine: Engine, message: str) -> list[int]:
    return engine.tokenize_prompt(None, None, [{"role": "user", "content": message}])


def run(engine: Engine, message: str, params: SamplingParams) -> Completion:
    return engine.generate([chat_ids(engine, message)], params)[0]


def stream(
    engine: Engine, request_id: str, message: str, params: SamplingParams
) -> list[RequestOutput]:
    ids = chat_ids(engine, message)
    return list(engine.stream(request_id, None, params, prompt_token_ids=ids))


@pytest.mark.parametrize(
    ("stop", "text"),
    [
        (("Paris",), "The capital of France is "),  # one token
        (("of France",), "The capital "),  # two whole tokens
        (("tal of Fr",), "The capi"),  # starts and ends inside tokens
        (("Lyon", "France is"), "The capital of "),  # the one that matches
        (("is Lyon",), ANSWER),  # a held-back prefix that never completes
        ((".",), "The capital of France is Paris"),
    ],
)
def test_stop_strings_cut_the_text(engine: Engine, stop: tuple[str, ...], text: str) -> None:
    params = SamplingParams(max_tokens=32, stop=stop)
    out = run(engine, QUESTION, params)
    assert out.text == text
    assert out.finish_reason is FinishReason.STOP
    assert out.usage.completion_tokens == len(out.token_ids)
    if text != ANSWER:  # the stop string was generated, then cut from the text
        decoded = engine.tokenizer.decode(out.token_ids)
        assert decoded.startswith(text) and any(decoded[len(text) :].startswith(s) for s in stop)
        assert out.token_ids[-1] not in engine.tokenizer.eos_token_ids

    outputs = stream(engine, f"stop-{stop}", QUESTION, params)
    deltas = [o.text_delta for o in outputs]
    assert "".join(deltas) == text
    for s in stop:
        assert all(s not in d for d in deltas)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert [t for o in outputs for t in o.new_token_ids] == out.token_ids
    engine.check_integrity()


def test_stop_strings_hold_back_only_possible_prefixes(engine: Engine) -> None:
    """Text that may begin a stop string waits; other text is streamed at once."""
    free = stream(engine, "free", QUESTION, SamplingParams(max_tokens=32))
    held = stream(engine, "held", QUESTION, SamplingParams(max_tokens=32, stop=("France is X",)))
    free_deltas = [o.text_delta for o in free]
    held_deltas = [o.text_delta for o in held]
    assert free_deltas == ["The", " capital", " of", " France", " is", " Paris", ".", ""]
    # "France" and "France is" could still become the stop string; " Paris" rules it out.
    assert held_deltas == ["The", " capital", " of", " ", "", "France is Paris", ".", ""]
    assert held[-1].finish_reason is FinishReason.STOP
    engine.check_integrity()


def test_streamed_non_ascii_deltas_are_whole_characters(engine: Engine) -> None:
    params = SamplingParams(max_tokens=24)  # ends after a whole emoji
    out = run(engine, NON_ASCII_REQUEST, params)
    outputs = stream(engine, "non-ascii", NON_ASCII_REQUEST, params)
    deltas = [o.text_delta for o in outputs]
    assert "".join(deltas) == out.text == engine.tokenizer.decode(out.token_ids)
    assert all("\ufffd" not in d for d in deltas)
    assert any(not c.isascii() for c in out.text)
    assert "" in deltas[:-1]  # a character really was split across tokens and held back
    assert out.text.startswith("Café")
    engine.check_integrity()


def test_detokenizer_never_splits_a_character(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    token_ids = tokenizer.encode(NON_ASCII_TEXT, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, chat_ids(engine, QUESTION))
    deltas = [detokenizer.add([token_id]) for token_id in token_ids]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == detokenizer.text == NON_ASCII_TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # some characters really were split across tokens
    # A sequence cut inside a character gets the partial one only at the end, from flush.
    cut = IncrementalDetokenizer(tokenizer, [])
    first_emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(first_emoji) > 1
    assert cut.add(first_emoji[:-1]) == ""
    assert cut.flush().endswith("\ufffd")
    engine.check_integrity()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_skip_special_tokens(engine: Engine, skip_special_tokens: bool) -> None:
    tokenizer = engine.tokenizer
    eos_id = min(tokenizer.eos_token_ids)
    eos_text = tokenizer.id_to_token(eos_id)
    assert eos_text is not None and tokenizer.is_special(eos_id)
    # Past EOS (ignore_eos) the end-of-turn token is ordinary output.
    params = SamplingParams(max_tokens=12, ignore_eos=True, skip_special_tokens=skip_special_tokens)
    out = run(engine, QUESTION, params)
    assert eos_id in out.token_ids
    assert out.text.startswith(ANSWER)
    assert (eos_text in out.text) is not skip_special_tokens
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=skip_special_tokens)
    # A token that ends the request is never part of the text.
    stopped = run(engine, QUESTION, SamplingParams(skip_special_tokens=skip_special_tokens))
    assert stopped.text == ANSWER
    assert stopped.token_ids[-1] == eos_id
    engine.check_integrity()


def test_logprobs_agree_with_the_logits(engine: Engine) -> None:
    prompt = chat_ids(engine, QUESTION)
    outputs = stream(engine, "logprobs", QUESTION, SamplingParams(max_tokens=32, logprobs=5))
    token_ids = [o.new_token_ids[0] for o in outputs]
    logits = prefill_logits(engine, prompt + token_ids[:-1])[len(prompt) - 1 :]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for position, output in enumerate(outputs):
        (entry,) = output.logprobs
        assert entry.token_id == token_ids[position]
        assert entry.logprob <= 0.0
        assert len(entry.top) == 5
        assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob))  # greedy
        values = [logprob for _, logprob in entry.top]
        assert values == sorted(values, reverse=True)
        assert sum(torch.tensor(values).exp()) <= 1.0 + 1e-5
        assert entry.logprob == pytest.approx(expected[position, entry.token_id].item(), abs=1e-4)
        top_ids = torch.topk(expected[position], 5).indices.tolist()
        assert [token_id for token_id, _ in entry.top] == top_ids
    engine.check_integrity()


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    prompt = chat_ids(engine, "Write a short poem about the sea.")

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=seed)

    first = engine.generate([prompt], params(7))[0]
    again = engine.generate([prompt], params(7))[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    others = [engine.generate([prompt], params(seed))[0].token_ids for seed in (8, 9, 10)]
    assert any(tokens != first.token_ids for tokens in others)
    # A seeded request draws from its own generator: a batch neighbour does not change it.
    other_prompt = chat_ids(engine, QUESTION)
    batched = engine.generate([other_prompt, prompt], params(7))[1]
    assert batched.token_ids == first.token_ids
    engine.check_integrity()


# The engine's two ends of the prefill -> decode handoff, with the real tokenizer: a request
# prefilled (prefill_only) and taken over (add_remote_request, attach_kv) streams exactly what
# the same request streams on one engine, however its first token ends or splits the text.
# Both ends run on one engine here (the KV changes owner without a copy; the copy and the
# transport are tested in tests/unit/test_engine_kv_handoff.py and the kvtransfer tests).
BYTE_C3 = 142  # half of a 2-byte UTF-8 character
HANDOFF_CASES = {
    "partial-utf8-first": SamplingParams(max_tokens=4, logit_bias=((BYTE_C3, 15.0),)),
    "partial-utf8-only": SamplingParams(max_tokens=1, logit_bias=((BYTE_C3, 15.0),)),
    "stop-over-tokens-1-2": SamplingParams(max_tokens=8, stop=("s.",)),
    "eos-first": SamplingParams(max_tokens=8, logit_bias=((2, 100.0),)),
}


@pytest.mark.parametrize("case", list(HANDOFF_CASES))
def test_a_handed_off_request_streams_as_on_one_engine(engine: Engine, case: str) -> None:
    params = HANDOFF_CASES[case]
    prompt = engine.tokenize_prompt("The capital of France is", None, None)
    expected = list(engine.stream(f"one-{case}", None, params, prompt_token_ids=prompt))
    engine.add_request(f"p-{case}", None, params, prompt_token_ids=prompt, prefill_only=True)
    while not (done := engine.take_prefilled()):
        assert engine.step() == []  # prefill: no text, no finish
    (prefilled,) = done
    first = engine.add_remote_request(
        f"d-{case}", prompt, prefilled.first_token_id, params, prefill_usage=prefilled.usage
    )
    got = [first]
    if first.finished:
        assert engine.block_manager.release(prefilled.kv.owner)
    else:
        engine.attach_kv(f"d-{case}", prefilled.kv.owner)
        while engine.has_unfinished_requests():
            got += engine.step()
    assert [(o.new_token_ids, o.text_delta, o.finish_reason) for o in got] == [
        (o.new_token_ids, o.text_delta, o.finish_reason) for o in expected
    ]
    counts = [(u.prompt_tokens, u.cached_tokens, u.completion_tokens)
              for u in (got[-1].usage, expected[-1].usage)]  # fmt: skip
    assert counts[0] == counts[1]
    engine.check_integrity()
