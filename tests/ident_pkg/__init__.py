"""A runner whose old identity (``module.QualName``) was that of ``ident_pkg.sub:Y``.

``ident_pkg:sub.Y`` (here) and ``ident_pkg.sub:Y`` both read ``ident_pkg.sub.Y``
when module and qualified name are joined with a dot.
"""

from __future__ import annotations

from typing import Any

from packmule import Runner


class sub:  # named like the module it collides with
    class Y(Runner):
        def run(self, value: Any = None) -> Any:
            return ["nested", value]


NestedY = sub.Y  # importing ident_pkg.sub rebinds ``sub`` to the module; this stays
