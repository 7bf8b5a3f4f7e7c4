"""Choosing the next token of each sequence from its logits.

Order of operations per row: logit bias, penalties, then greedy argmax, or temperature,
top-k, top-p, min-p and a draw. Seeded requests draw from their own generator, so their
output does not depend on what else is in the batch. Log-probabilities are those of the
model's raw distribution (before bias, penalties and temperature).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the top-n (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class SampleRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # None: the sampler's shared generator


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        """logits: [num_rows, vocab] fp32, one row per entry of `rows`."""
        assert logits.shape[0] == len(rows), "one logits row per sequence"
        raw_logits = logits
        if any(r.params.logit_bias or r.params.has_penalties for r in rows):
            logits = logits.clone()
            for i, row in enumerate(rows):
                _apply_bias_and_penalties(logits[i], row)
        token_ids = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if not row.params.is_greedy:
                token_ids[i] = self._draw(logits[i], row)
        ids = token_ids.tolist()
        return SamplerOutput(ids, _logprobs(raw_logits, rows, ids))

    def _draw(self, logits: torch.Tensor, row: SampleRow) -> int:
        probs = warp_probs(logits, row.params)
        generator = row.generator or self.generator
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        return int((probs / noise).argmax())


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


def _apply_bias_and_penalties(logits: torch.Tensor, row: SampleRow) -> None:
    """In place on one row [vocab]."""
    params = row.params
    for token_id, bias in params.logit_bias:
        logits[token_id] += bias
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)))
        values = logits[seen]
        logits[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if (params.frequency_penalty or params.presence_penalty) and row.output_token_ids:
        counts = Counter(row.output_token_ids)
        ids = torch.tensor(list(counts))
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits[ids] -= params.frequency_penalty * freq + params.presence_penalty


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
