"""One-line error messages shared by every layer (models, schedulers, config, CLIs).

Standard library only: the CLI imports it before anything heavy (fast --help, an early SIGTERM handler), and the
model and scheduler packages import it without importing anything above them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_choice(key: str, value: Any, choices: Sequence[Any], owner: str | None = None) -> None:
    """Raise ValueError naming `key` (and `owner`, when given) and the allowed values unless `value` is one."""
    if value not in choices:
        supported = ", ".join(repr(c) for c in choices)
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{key}={value!r} is not supported; choose one of {supported}.")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (orbax, tensorstore and the Hub client write several)."""
    text = str(error)
    # ml_collections repr-quotes the message of an error raised inside a config override ('...\n...').
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].replace("\\n", " ").replace("\\'", "'")
    return " ".join(text.split()) or type(error).__name__
