"""A conversation turn, as clients send it and chat templates render it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: who spoke (`system`, `user`, `assistant`, ...) and what."""

    role: str
    content: str
