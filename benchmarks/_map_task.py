"""The function ``bench_map_memory.py`` runs through ``fenfa map``: cheap, per record."""

from __future__ import annotations

import zlib
from typing import Any


def measure(record: dict[str, Any]) -> dict[str, int]:
    text = record["text"]
    return {"id": record["id"], "length": len(text), "crc": zlib.crc32(text.encode())}
