"""What a pool knows about how its work went.

For now: the decision ``auto`` took and its evidence (``pool.insights.decision``).
Per-task records, the summary and the HTML timeline come with issue 7.
"""

from __future__ import annotations

from dataclasses import dataclass

from .auto import Decision


@dataclass
class Insights:
    """``decision``: what ``backend="auto"`` chose and why (None for a fixed backend)."""

    decision: Decision | None = None


__all__ = ["Insights"]
