"""The module-level twin of ``ident_pkg:sub.Y``."""

from __future__ import annotations

from typing import Any

from packmule import Runner


class Y(Runner):
    def run(self, value: Any = None) -> Any:
        return ["flat", value]
