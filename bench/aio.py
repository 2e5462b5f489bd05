"""Run a coroutine on uvloop when it is installed (and wanted), else on asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - optional
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
