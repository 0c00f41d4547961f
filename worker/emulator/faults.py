"""Failure injection for the emulator, armed at run time by tests.

Each one-shot fault is armed for the next N e-mails that reach it and is used up by them.
When several are armed, the earliest point in the SMTP transaction wins: a drop mid-DATA,
then an error answer to DATA, then a drop after the final `.`.
"""

from __future__ import annotations

from typing import Protocol


class Listener(Protocol):
    async def stop_listening(self, *, drop_open: bool) -> None: ...

    async def resume_listening(self) -> None: ...


class Faults:
    def __init__(self, listener: Listener, latency_s: float = 0.0) -> None:
        self._listener = listener
        # Seconds between taking an e-mail and answering its DATA: a slow gateway.
        self.latency_s = latency_s
        self._refusing = False
        self._data_failures: list[str] = []
        self._mid_data_drops = 0
        self._after_dot_drops = 0

    @property
    def refusing(self) -> bool:
        return self._refusing

    async def refuse_connections(self, *, drop_open: bool = True) -> None:
        """Stop listening, so a client's connect gets ECONNREFUSED; with `drop_open`,
        also cut the sessions already open, as a gateway that went away would."""
        self._refusing = True
        await self._listener.stop_listening(drop_open=drop_open)

    async def accept_connections(self) -> None:
        """Listen again, on the same port."""
        await self._listener.resume_listening()
        self._refusing = False

    def fail_data(self, code: int, times: int = 1, message: str = "emulated failure") -> None:
        """Answer the next `times` e-mails with `code` (4xx or 5xx) where the final reply to
        DATA would be; nothing is taken."""
        if not 400 <= code <= 599:
            raise ValueError(f"an SMTP failure code is 4xx or 5xx, not {code}")
        self._data_failures.extend([f"{code} {message}"] * times)

    def drop_mid_data(self, times: int = 1) -> None:
        """Close the connection right after `354` for the next `times` e-mails; nothing
        is taken."""
        self._mid_data_drops += times

    def drop_after_dot(self, times: int = 1) -> None:
        """Take the next `times` e-mails (they are delivered and replied to) but close the
        connection instead of answering `250`: the client cannot know they were taken."""
        self._after_dot_drops += times

    def clear(self) -> None:
        """Disarm every one-shot fault and the latency (listening is left as it is)."""
        self._data_failures.clear()
        self._mid_data_drops = self._after_dot_drops = 0
        self.latency_s = 0.0

    def take_mid_data_drop(self) -> bool:
        if self._mid_data_drops:
            self._mid_data_drops -= 1
            return True
        return False

    def take_data_failure(self) -> str | None:
        return self._data_failures.pop(0) if self._data_failures else None

    def take_after_dot_drop(self) -> bool:
        if self._after_dot_drops:
            self._after_dot_drops -= 1
            return True
        return False
