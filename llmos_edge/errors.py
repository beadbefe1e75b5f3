"""Errors a person can cause: one sentence saying what is wrong, and a hint saying what to do."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in input the user controls (config, model file, device, disk), never a programming error."""

    def __init__(self, message: str, hint: str = "", *, passing: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.passing = passing  # the cause may clear by itself (a lock another process holds): worth a retry

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message
