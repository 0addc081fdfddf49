"""The one user-facing error of the core: a spec field is wrong, shown with its value and the fix."""

from __future__ import annotations

from typing import Any


class SpecError(ValueError):
    """A spec field is invalid; the message names the field path, shows the value and says the fix."""

    def __init__(self, path: str, problem: str, fix: str | None = None) -> None:
        self.path = path
        message = f"spec.{path}: {problem}" if path else f"spec: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


def show(value: Any, limit: int = 120) -> str:
    """``repr`` cut to ``limit`` characters: a message shows the value, never a whole document."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails is still reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
