"""The prefill side of the handoff: prompts whose prefill is done, their KV held for transfer.

The engine ends a prefill_only request as a `Prefilled` (first token sampled, no text, no
finish reason, prompt KV pinned). This role keeps it from the engine thread until the prefill
worker takes it to ship its KV (`take`), or frees the KV if the request is aborted first: a
caller that gave up between the two must not leak the blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.engine_loop import EngineLoop, LoopRole

if TYPE_CHECKING:
    from engine.engine import Prefilled


class HeldKV(LoopRole):
    """See the module docstring. `take` from any thread; the rest on the engine thread."""

    def __init__(self, release: Callable[[str], bool]) -> None:
        """release: the engine's block_manager.release (frees KV by its owner)."""
        self._release = release
        self._held: dict[str, Prefilled] = {}

    def take(self, request_id: str) -> Prefilled | None:
        """A finished prefill and its KV, once (the caller ships or releases it); None if it
        has none (aborted, or not done)."""
        return self._held.pop(request_id, None)

    def prefilled(self, loop: EngineLoop, item: Prefilled) -> None:
        self._held[item.request_id] = item  # before its caller hears of it
        loop.deliver(item.request_id, item, done=True)

    def abort(self, loop: EngineLoop, request_id: str) -> bool:
        held = self._held.pop(request_id, None)
        if held is None:
            return False
        self._release(held.kv.owner)  # done, but its caller gave up before taking the KV
        return True

    def holders(self) -> list[str]:
        return [item.kv.owner for item in list(self._held.values())]
