"""The state a request's fate depends on, behind one interface (`StateStore`).

Per request id, a ledger entry walks `claimed -> sending(mail) -> sent(mail) -> answered`,
or becomes `released` when nothing went out. Beside it: the records of submitted e-mails
(gateway id -> what a reply needs), the identical-content windows and subscriber streaks,
the account's pace and circuit, and whether the account was stopped.

`memory.MemoryStateStore` keeps it in the process (`make run`, unit tests); `redis.RedisStateStore`
keeps it in Redis, shared by every replica. Both follow the same contract, checked by the
same tests. Calls are batched: one per consume burst (`intake`), one per e-mail
(`begin_sending`), one per settled set (`finish`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from worker.contract import MetadataValue
from worker.delivery import RequestCopy
from worker.errors import RetryableError
from worker.lanes import Lane
from worker.settings import DEFAULT_ACCOUNT, LimitSettings


class StateUnavailable(RetryableError, ConnectionError):
    """The shared state cannot be read or written: nothing may be sent until it can."""

    code = "state_unavailable"


class MailBusy(RetryableError):
    """Another live replica is handling a reply to this e-mail right now: ask again later."""

    code = "mail_busy"


class VerdictKind(StrEnum):
    new = "new"  # claimed for this process and admitted: may be sent
    busy = "busy"  # another live process holds it (or this one does, in a batch)
    wait = "wait"  # a gateway limit: not claimed, try again after `wait`
    duplicate = "duplicate"  # the id was used for a different message
    replay = "replay"  # sent or answered already: `event` is its last event
    unknown = "unknown"  # its e-mail was being sent by a process that died: `mail_id`
    ledger_lost = "ledger_lost"  # the store lost its memory and this may have gone out


@dataclass(frozen=True, slots=True)
class Intake:
    """One arriving request, as the store needs to judge it."""

    request_id: str
    fingerprint: str
    content_key: str
    subscribers: tuple[str, ...]
    redelivered: bool


@dataclass(frozen=True, slots=True)
class Refund:
    """An admission given back: the request's e-mail was refused whole (or never went), so
    the gateway counted it neither as an identical copy nor towards its subscribers'
    streaks."""

    content_key: str
    subscribers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    wait: float = 0.0
    reason: str = ""
    mail_id: str | None = None
    event: str | None = None


@dataclass(frozen=True, slots=True)
class CarriedRequest:
    """What a reply (or a process that never saw the submission) needs about one request of
    a submitted e-mail."""

    request_id: str
    recipients: tuple[str, ...]
    sms_parts: int | None
    attempt: int
    first_seen: float
    metadata: dict[str, MetadataValue]
    copy: RequestCopy
    content_key: str = ""
    lane: Lane = Lane.normal
    account: str = DEFAULT_ACCOUNT
    # Who the recipients are (`Recipient.key`), as the subscriber streaks count them.
    subscribers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "recipients": list(self.recipients),
            "sms_parts": self.sms_parts,
            "attempt": self.attempt,
            "first_seen": self.first_seen,
            "metadata": self.metadata,
            "copy": self.copy.to_json(),
            "content_key": self.content_key,
            "lane": self.lane.value,
            "account": self.account,
            "subscribers": list(self.subscribers),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CarriedRequest:
        return cls(
            request_id=data["request_id"],
            recipients=tuple(data["recipients"]),
            sms_parts=data["sms_parts"],
            attempt=data["attempt"],
            first_seen=data["first_seen"],
            metadata=dict(data["metadata"]),
            copy=RequestCopy.from_json(data["copy"]),
            content_key=data["content_key"],
            lane=Lane(data.get("lane", Lane.normal)),
            account=data.get("account", DEFAULT_ACCOUNT),
            subscribers=tuple(data.get("subscribers", ())),
        )


@dataclass(frozen=True, slots=True)
class MailRecord:
    mail_id: str
    requests: tuple[CarriedRequest, ...]
    submitted_at: float
    # What the account's parts pace counts for the e-mail (PreparedRequest.pace_parts).
    sms_parts: int = 0
    # The submission span's context as W3C trace headers, for the reply's span to link to.
    trace: Mapping[str, str] = field(default_factory=dict)
    # The SMTP session broke after the data went out, or the process sending it died: only
    # a reply can tell what happened.
    outcome_unknown: bool = False
    # The split its requests travel in (`worker.fate.Split.group`), or "".
    group: str = ""

    @property
    def urgent(self) -> bool:
        """A high-priority e-mail (its requests share their lane)."""
        return bool(self.requests) and self.requests[0].lane == Lane.high

    def dumps(self) -> str:
        return json.dumps(
            {
                "mail_id": self.mail_id,
                "requests": [r.to_json() for r in self.requests],
                "submitted_at": self.submitted_at,
                "sms_parts": self.sms_parts,
                "trace": dict(self.trace),
                "outcome_unknown": self.outcome_unknown,
                "group": self.group,
            },
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, raw: str | bytes) -> MailRecord:
        data = json.loads(raw)
        return cls(
            mail_id=data["mail_id"],
            requests=tuple(CarriedRequest.from_json(r) for r in data["requests"]),
            submitted_at=data["submitted_at"],
            sms_parts=data["sms_parts"],
            trace=data["trace"],
            outcome_unknown=data["outcome_unknown"],
            # Records written before splits were recorded have none.
            group=data.get("group", ""),
        )


class GateKind(StrEnum):
    go = "go"  # the record is written and its requests are `sending`: submit now
    wait = "wait"  # the pace or the circuit says not yet: nothing was written
    stopped = "stopped"  # the account was stopped: nothing may be sent
    lost = "lost"  # some claims are no longer this process's: nothing was written


@dataclass(frozen=True, slots=True)
class Gate:
    kind: GateKind
    wait: float = 0.0
    reason: str = ""
    lost: tuple[str, ...] = ()
    probe: bool = False


@dataclass(frozen=True, slots=True)
class Finish:
    """The ledger side of settling a set of fates, applied in one step."""

    # request id -> (mail id, the event published for it, its fingerprint): the e-mail went
    # out (or may have). Recorded over any state but `answered`, even where the entry is
    # gone (a store that lost its data): that is what keeps the request from going twice.
    sent: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    # request id -> (its final event, its fingerprint): the gateway answered.
    answered: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # requests of which nothing went out: a later copy may be sent.
    released: Sequence[str] = ()
    # admissions of requests whose e-mail was refused whole: no copy, no message after all.
    refunds: Sequence[Refund] = ()
    # e-mails that are settled: their records are dropped.
    mails_done: Sequence[str] = ()
    # e-mails whose reply was applied: their records are dropped and a mark is kept (for
    # the dedup TTL), so that the same reply read again (from a mailbox, after a crash
    # before it was moved) is known as applied rather than taken for a stranger's.
    replied: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class SplitNotes:
    """What the ledger knows of a split (`worker.fate.Split`) once one of its e-mails
    failed: how many of its e-mails failed and got through so far, on any replica, and
    whether its budget had room for two more e-mails (taken if so)."""

    failed: int = 1
    succeeded: int = 0
    granted: bool = True


def pace_depth(limits: LimitSettings, urgent: bool) -> float:
    """How much of the pace's one-second burst an e-mail may fill: normal and bulk e-mails
    leave `high_share` of it free at all times, so a high-priority e-mail never waits
    behind them, while they may still use the whole rate when nothing urgent comes."""
    return 1.0 if urgent else 1 - limits.high_share


def high_rate_share(limits: LimitSettings) -> float:
    """The share of the pace high-priority e-mails may use over time: they leave
    `others_floor` to the rest, so bulk never starves."""
    return 1 - limits.others_floor


class CircuitView(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class StateStore(Protocol):
    """Every method raises StateUnavailable when the state cannot be reached."""

    owner: str

    async def start(self) -> None:
        """Connect and announce this process as alive (its claims count as held)."""

    async def close(self) -> None: ...

    async def heartbeat(self) -> None:
        """Keep this process's claims alive; also detects a store that lost its memory."""

    async def intake(self, items: Sequence[Intake]) -> list[Verdict]:
        """Judge a burst of arriving requests: the ledger first, then for new ones the
        identical-content and subscriber limits; a request judged `new` is claimed for this
        process and counted against the limits."""

    async def begin_sending(self, record: MailRecord) -> Gate:
        """Before DATA: if the account, the circuit and the pace allow an e-mail of
        `record.sms_parts` parts now and every request is still claimed by this process,
        write the record and mark its requests `sending`, in one step. Normal and bulk
        e-mails keep a part of the pace's burst free (`pace_depth`); high-priority ones
        draw on a share of the rate too (`high_rate_share`)."""

    async def finish(self, finish: Finish) -> None: ...

    async def take_mail(self, mail_id: str) -> MailRecord | None:
        """The record of an e-mail, for one reply at a time: None when it is unknown (or
        answered); MailBusy while another live replica handles a reply to it (until its
        `finish` or `give_back_mail`, or its death). A lease of this process's own is taken
        again: the caller keeps one reply per e-mail in hand at a time."""

    async def knows_mail(self, mail_id: str) -> bool:
        """Whether the e-mail's record is held (sent and not yet settled), by any replica:
        a plain read that takes no lease, for telling a reply's mangled body ID from the ID
        of another e-mail of this account."""

    async def give_back_mail(self, mail_id: str) -> None:
        """A reply could not be settled: its e-mail's record may be taken again."""

    async def mail_replied(self, mail_id: str) -> bool:
        """Whether a reply to this e-mail was applied (within the dedup TTL)."""

    async def mark_unknown(self, mail_id: str) -> MailRecord | None:
        """The e-mail's submission broke after its data went out: flag its record."""

    async def unanswered(self, older_than: float) -> list[str]:
        """Ids of e-mails submitted before `older_than` (wall time) with no reply yet."""

    async def note_split(
        self, root: str, *, failed: bool, allowance: int, ttl: float
    ) -> SplitNotes:
        """An e-mail of the split that began with e-mail `root` was answered: count it, and
        for a failure take two e-mails (its halves) while the split has sent at most
        `allowance`, or without limit once one of its e-mails got through. Replicas share
        the counts; the split is forgotten `ttl` seconds after its last answer."""

    async def open_circuit(self, reason: str, pause: float | None) -> float:
        """Pause all sending of the account; None doubles the last pause (capped)."""

    async def close_circuit(self) -> None: ...

    async def circuit(self) -> CircuitView: ...

    async def stop_account(self, reason: str) -> None: ...

    async def account_stopped(self) -> str | None:
        """The reason the account was stopped, or None."""
