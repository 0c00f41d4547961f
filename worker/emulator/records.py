"""What the emulator keeps about the e-mails it took: one record per e-mail, and the
deliveries optionally appended to a JSON-lines file that outlives the process."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from worker.protocol.decode import DecodedMail
from worker.protocol.replies import Reply

from .rules import Delivery, Flood


@dataclass(frozen=True, slots=True)
class MailRecord:
    """One e-mail the emulator answered `250` to (or took before dropping the connection)."""

    received_at: float
    peer: str
    envelope_from: str
    content: bytes
    decoded: DecodedMail | None
    reply: Reply
    reason: str
    # The reply e-mail's body; None when none went out (test=0 without an error, no relay,
    # or no address to answer).
    reply_text: str | None
    deliveries: tuple[Delivery, ...]
    floods: tuple[Flood, ...]

    @property
    def mail_id(self) -> str | None:
        return self.reply.mail_id


class DeliveryLog:
    """Appends each delivery as one JSON object per line, flushed at once so that a reader
    (another process, a test after a crash) sees every delivery the emulator made."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: TextIO | None = None

    def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._path.open("a", encoding="utf-8")

    def write(self, deliveries: tuple[Delivery, ...]) -> None:
        if self._file is None or not deliveries:
            return
        for delivery in deliveries:
            self._file.write(json.dumps(dataclasses.asdict(delivery), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
