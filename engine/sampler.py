"""Choosing the next token of each sequence from its logits: logit bias, penalties, then greedy
argmax, or temperature, top-k, top-p, min-p and a draw (seeded requests from their own
generator). Log-probabilities are those of the raw distribution. Bias and penalties are batched
tensor ops (`apply_bias_and_penalties`), never a loop over entries, so one request's large bias
costs its neighbours no more than a few tensor ops.

A seeded request's draw for its output token at position p (0: the first token) is a function of
(seed, p) alone (`draw_seed`): not of the worker, the batch, or how many draws came before. So a
request continued elsewhere (prefilled on one worker, decoded on another; replayed on another
decode worker after losing its own; recomputed after preemption) samples exactly what it would
have where it started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from contracts.outputs import TokenLogprobs
from contracts.sampling_params import SamplingParams


class LogitBias(NamedTuple):
    """A request's logit bias as tensors on the logits' device."""

    token_ids: torch.Tensor  # [num_entries] int64
    values: torch.Tensor  # [num_entries] fp32

    @staticmethod
    def of(params: SamplingParams, device: torch.device | str) -> LogitBias | None:
        if not params.logit_bias:
            return None
        ids, values = zip(*params.logit_bias, strict=True)
        return LogitBias(
            torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(values, dtype=torch.float32, device=device),
        )


@dataclass(frozen=True, slots=True)
class SampleRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int | None  # None: the sampler's shared generator; else keyed by (seed, position)
    logit_bias: LogitBias | None = None  # params.logit_bias as tensors (None: made here)


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


_MASK_64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's draw for its output token `position`: a
    splitmix64 mix of both, so neighbouring seeds and positions give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK_64
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
        x ^= x >> 31
    return x & ((1 << 63) - 1)  # manual_seed takes a non-negative int64


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._keyed = torch.Generator(device=device)  # reseeded for every seeded draw

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        """logits: [num_rows, vocab] fp32, one row per entry of `rows`."""
        assert logits.shape[0] == len(rows), "one logits row per sequence"
        raw_logits = logits
        if any(r.params.logit_bias or r.params.has_penalties for r in rows):
            logits = logits.clone()
            apply_bias_and_penalties(logits, rows)
        token_ids = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if not row.params.is_greedy:
                token_ids[i] = self._draw(logits[i], row)
        ids = token_ids.tolist()
        return SamplerOutput(ids, _logprobs(raw_logits, rows, ids))

    def greedy(self, logits: torch.Tensor) -> SamplerOutput:
        """What __call__ returns for rows that are all plain_greedy: the argmax of each."""
        ids = logits.argmax(dim=-1).tolist()
        return SamplerOutput(ids, [None] * len(ids))

    def _draw(self, logits: torch.Tensor, row: SampleRow) -> int:
        probs = warp_probs(logits, row.params)
        generator = self.generator
        if row.seed is not None:
            generator = self._keyed.manual_seed(draw_seed(row.seed, len(row.output_token_ids)))
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        return int((probs / noise).argmax())


def plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing else to apply or report (no bias, penalties, logprobs)."""
    return (
        params.temperature == 0.0
        and not params.logit_bias
        and not params.has_penalties
        and params.logprobs is None
    )


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p over one row [vocab] -> probabilities [vocab]."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def apply_bias_and_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """Logit bias, then repetition, frequency and presence penalties, in place on
    logits [num_rows, vocab] fp32 (contiguous), batched over the rows that have them.

    Penalties touch only the (row, token) pairs that occur: flat indices row * vocab + token
    over every penalized row's tokens at once, never a dense [rows, vocab] pass per step."""
    _add_logit_bias(logits, rows)
    vocab = logits.shape[1]
    flat = logits.view(-1)  # [num_rows * vocab]
    repeated = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if repeated:
        seen = _flat_ids(
            [(i, rows[i].prompt_token_ids) for i in repeated]
            + [(i, rows[i].output_token_ids) for i in repeated],
            vocab, logits.device,
        ).unique()  # fmt: skip
        penalty = _per_row([r.params.repetition_penalty for r in rows], logits)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    counted = [
        i for i, row in enumerate(rows)
        if row.params.frequency_penalty or row.params.presence_penalty
    ]  # fmt: skip
    if counted:
        outputs = _flat_ids([(i, rows[i].output_token_ids) for i in counted], vocab, logits.device)
        ids, counts = outputs.unique(return_counts=True)
        row_of = ids // vocab
        frequency = _per_row([r.params.frequency_penalty for r in rows], logits)[row_of]
        presence = _per_row([r.params.presence_penalty for r in rows], logits)[row_of]
        flat[ids] -= frequency * counts.to(logits.dtype) + presence


def _add_logit_bias(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """logits[i, token] += bias for every (token, bias) of every row: one index_put."""
    biases: list[tuple[int, LogitBias]] = []
    for i, row in enumerate(rows):
        bias = row.logit_bias or LogitBias.of(row.params, logits.device)
        if bias is not None:
            biases.append((i, bias))
    if not biases:
        return
    row_ids = torch.cat([torch.full_like(b.token_ids, i) for i, b in biases])  # [num_entries]
    token_ids = torch.cat([b.token_ids for _, b in biases])
    values = torch.cat([b.values for _, b in biases]).to(logits.dtype)
    logits.index_put_((row_ids, token_ids), values, accumulate=True)


def _flat_ids(
    token_ids: list[tuple[int, list[int]]], vocab: int, device: torch.device
) -> torch.Tensor:
    """row * vocab + token for every (row, tokens) pair's tokens: [total tokens] int64 (one
    tensor conversion per list, no Python loop over tokens)."""
    parts = [torch.tensor(ids, dtype=torch.int64) + row * vocab for row, ids in token_ids]
    return torch.cat(parts).to(device)


def _per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """[num_rows] in like's dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _logprobs(
    logits: torch.Tensor, rows: list[SampleRow], token_ids: list[int]
) -> list[TokenLogprobs | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return out
    logprobs = logits[wanted].log_softmax(-1)
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs or 0
        top = torch.topk(logprobs[j], n) if n else None
        top_pairs = (
            ()
            if top is None
            else tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        )
        out[i] = TokenLogprobs(token_ids[i], float(logprobs[j, token_ids[i]]), top_pairs)
    return out
