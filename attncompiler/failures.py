"""How a caught exception reads in logs and reports: its type and the first line of its message."""

from __future__ import annotations


def failure_text(e: BaseException) -> str:
    """``"Type: first line of the message"`` (just ``"Type"`` where the message is empty)."""
    message = str(e)
    return f"{type(e).__name__}: {message.splitlines()[0]}" if message.strip() else type(e).__name__
