"""Stands in for the governor's `record` in tests of thermal control and the memory budget on their own."""

from __future__ import annotations

import json
from typing import Any


class Decisions:
    """Keeps each decision (message, action, inputs, before, after), checking it serialises as the store needs."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any], dict[str, Any], dict[str, Any]]] = []

    def __call__(
        self, message: str, action: str, inputs: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        json.dumps([inputs, before, after])
        self.rows.append((message, action, inputs, before, after))

    def actions(self) -> list[str]:
        return [r[1] for r in self.rows]
