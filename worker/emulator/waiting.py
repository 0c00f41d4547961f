"""Waiting until something has been recorded, without polling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Signal:
    """Wakes every waiter each time `pulse()` is called; waiters re-check their condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def pulse(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(
        self, condition: Callable[[], bool], timeout_s: float, describe: Callable[[], str]
    ) -> None:
        """Return once `condition()` holds; TimeoutError (saying `describe()`) after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    await self._event.wait()
        except TimeoutError:
            raise TimeoutError(f"after {timeout_s:g} s: {describe()}") from None
