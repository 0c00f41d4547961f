"""What becomes of a request, as values, and the plain decisions that produce them.

Nothing here does I/O: the service gathers the facts (the delivery, the ledger's verdict,
the SMTP outcome, the gateway's reply), these functions decide a `Fate` for each request,
and `worker.settle.Settler` applies a set of fates in one step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from worker.contract import (
    CHANNEL_NOT_OFFERED,
    CONTROL_CHARACTER,
    FRACTIONAL_TZ,
    INVALID_UNICODE,
    RESERVED_PREFIX,
    TEXT_TOO_LONG,
    MetadataValue,
    SendRequest,
    Status,
)
from worker.delivery import Delivery, RequestCopy
from worker.lanes import Lane
from worker.ledger import CarriedRequest, SplitNotes, Verdict, VerdictKind
from worker.protocol.replies import Action, Rejected
from worker.settings import RetrySettings
from worker.smtp_client import Outcome, SubmitResult

log = logging.getLogger(__name__)

# The error code of a final `unknown`: the gateway took the e-mail and never answered.
NO_REPLY = "no_reply"

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(frozen=True, slots=True)
class Subject:
    """One request being settled: the delivery that brought it (None for a request known
    only from an e-mail's record, when a reply settles it) and what its events need."""

    delivery: Delivery | None
    request_id: str | None
    copy: RequestCopy
    recipients: tuple[str, ...] = ()
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)
    attempt: int = 1
    first_seen: float = 0.0
    content_key: str = ""
    subscribers: tuple[str, ...] = ()
    sms_parts: int | None = None
    # The split it travels in (`Split.group`), kept by every copy until it ends.
    group: str = ""
    lane: Lane = Lane.normal
    account: str = "default"
    # Whether the ledger holds this process's claim (or later state) for it, to be advanced
    # or released by the settlement.
    claimed: bool = False

    @classmethod
    def of_carried(cls, carried: CarriedRequest, group: str = "") -> Subject:
        return cls(
            delivery=None,
            request_id=carried.request_id,
            copy=carried.copy,
            recipients=carried.recipients,
            metadata=carried.metadata,
            attempt=carried.attempt,
            first_seen=carried.first_seen,
            content_key=carried.content_key,
            subscribers=carried.subscribers,
            sms_parts=carried.sms_parts,
            group=group,
            lane=carried.lane,
            account=carried.account,
            claimed=True,
        )


@dataclass(frozen=True, slots=True)
class Reject:
    """Never sent: invalid, expired, forged or a reused id. `rejected` event."""

    code: str
    reason: str
    dead_letter: bool = True


@dataclass(frozen=True, slots=True)
class Later:
    """Not sent now: back to the queue through a retry queue after `wait` seconds. The
    event is `status` (none for a copy merely waiting for another copy to finish)."""

    wait: float
    code: str
    reason: str
    status: Status | None = Status.deferred
    next_attempt: bool = False
    group: str = ""
    gateway_error: int | None = None
    mail_id: str | None = None
    # The request had been admitted and counted as an identical copy: it was not one.
    refund: bool = False
    # Another copy of the request may be going out right now: should the ledger have lost
    # its data by the time this copy returns, it must not be taken for a fresh request.
    in_doubt: bool = False


def in_flight(wait: float = 1.0) -> Later:
    """Another copy of the request is in hand (here or in another replica): come back when
    that one is settled, and find its outcome in the ledger."""
    return Later(max(wait, 1.0), "in_flight", "another copy is being sent", None, in_doubt=True)


@dataclass(frozen=True, slots=True)
class Fail:
    """Failed for good and dead-lettered: after a gateway error (`mail_id` set: the gateway
    answered, which the ledger keeps) or when the worker gave up (nothing went out)."""

    code: str
    reason: str
    gateway_error: int | None = None
    mail_id: str | None = None
    refund: bool = False


@dataclass(frozen=True, slots=True)
class Submitted:
    """The e-mail carrying it went out (`unknown`: may have gone out)."""

    mail_id: str
    unknown: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Accepted:
    """The gateway replied OK to its e-mail."""

    mail_id: str


@dataclass(frozen=True, slots=True)
class Replay:
    """Already sent or answered: publish its last event again (same event id), ack."""

    event: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """It may have gone out and only a reply (or its timeout) can tell: say so, ack, and
    never send it again. `final`: nothing more will ever be known (its e-mail's reply never
    came): the ledger records it answered, and no later event follows."""

    code: str
    reason: str
    mail_id: str | None = None
    final: bool = False


@dataclass(frozen=True, slots=True)
class Requeue:
    """Back to the queue as it is, no event: it could not be judged now. On its last
    delivery before the queue's delivery limit it ends instead: `failed`, or `unknown` when
    its e-mail `may_have_gone`, and dead-lettered either way."""

    reason: str
    may_have_gone: bool = False


Fate = Reject | Later | Fail | Submitted | Accepted | Replay | Unknown | Requeue


# reading a delivery ---------------------------------------------------------------------


# Validation errors reported under a code of their own rather than `invalid_schema`, in
# this order of precedence (the contract's validators raise them by these names).
_OWN_CODES = (
    CHANNEL_NOT_OFFERED,
    CONTROL_CHARACTER,
    INVALID_UNICODE,
    RESERVED_PREFIX,
    TEXT_TOO_LONG,
    FRACTIONAL_TZ,
)


def read_request(body: bytes) -> SendRequest | Reject:
    """The request in a body, or why there is none. Hostile bodies raise more than
    ValidationError (RecursionError from deep nesting): none of it escapes, and the
    reason is plain printable text (no lone surrogate from the body)."""
    try:
        return SendRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors
        )
        reason = problems[:1000].encode("utf-8", "backslashreplace").decode()
        types = {e["type"] for e in errors}
        if "json_invalid" in types:
            return Reject("not_json", reason)
        code = next((c for c in _OWN_CODES if c in types), "invalid_schema")
        return Reject(code, reason)
    except (RecursionError, ValueError, UnicodeError, MemoryError) as exc:
        return Reject("not_json", f"unreadable body: {type(exc).__name__}")


def request_id_of(body: bytes) -> str | None:
    """The request id of a body that is not a valid request, when one can be read safely
    (printable ASCII, as the contract requires); None otherwise."""
    try:
        raw = json.loads(body)
    except (RecursionError, ValueError, UnicodeError):
        return None
    if isinstance(raw, dict):
        value = raw.get("request_id")
        if isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return None


# the ledger's verdict -----------------------------------------------------------------


def from_verdict(verdict: Verdict, identical_policy: str) -> Fate | None:
    """The fate of an arriving request judged by the ledger and the limits; None: send it."""
    kind = verdict.kind
    if kind == VerdictKind.new:
        return None
    if kind == VerdictKind.busy:
        return in_flight(verdict.wait)
    if kind == VerdictKind.wait:
        if verdict.reason == "identical_content" and identical_policy == "reject":
            return Reject(
                "duplicate", "identical request already sent as often as allowed this minute"
            )
        return Later(
            verdict.wait,
            verdict.reason,
            f"held back {verdict.wait:.0f} s to stay within the gateway's limits",
        )
    if kind == VerdictKind.duplicate:
        return Reject(
            "duplicate", "request_id was already used for a different message", dead_letter=False
        )
    if kind == VerdictKind.replay:
        assert verdict.event is not None
        return Replay(verdict.event)
    if kind == VerdictKind.unknown:
        return Unknown(
            "outcome_unknown",
            "its e-mail was being submitted by a worker that stopped; it may or may not have "
            "been sent, is not sent again, and the gateway's reply decides",
            verdict.mail_id,
        )
    return Unknown(
        "ledger_lost",
        "the shared ledger lost its data while this request was in flight; it may have been "
        "sent already and is not sent again",
    )


# after SMTP ------------------------------------------------------------------------------


def backoff(attempt: int, retry: RetrySettings) -> float:
    """Exponential backoff with full jitter, capped, and never a hot loop."""
    exponent = min(attempt - 1, 30)
    return max(random.uniform(0, min(retry.max_delay_s, retry.base_delay_s * 2**exponent)), 0.5)


def give_up_or_later(
    subject: Subject, expires_at: datetime | None, retry: RetrySettings, now: float, reason: str
) -> Fate:
    """A transient failure is a reason to wait: only age (or the request's own expiry)
    ends the waiting, never a count of attempts."""
    wait = backoff(subject.attempt, retry)
    if expires_at is not None and expires_at <= datetime.fromtimestamp(now + wait, UTC):
        return Reject(
            "expired", f"expires at {expires_at.isoformat()}, before it could be tried again"
        )
    if now + wait - subject.first_seen > retry.max_age_s:
        return Fail(
            "retries_exhausted",
            f"{reason}; gave up after {now - subject.first_seen:.0f} s",
            refund=True,
        )
    return Later(wait, "smtp_transient", reason, Status.retrying, next_attempt=True, refund=True)


def after_submission(result: SubmitResult, mail_id: str) -> Fate | None:
    """The fate of every request of an e-mail after its SMTP submission; None for a
    transient failure, which each request's age decides (`give_up_or_later`)."""
    if result.outcome == Outcome.accepted:
        return Submitted(mail_id)
    if result.outcome == Outcome.unknown:
        return Submitted(mail_id, unknown=True, detail=result.detail)
    if result.outcome == Outcome.permanent:
        return Fail("smtp_rejected", result.detail, refund=True)
    return None


# after the gateway's reply --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyPlan:
    """What a reply does: to each request of the e-mail, and to the account."""

    fates: Sequence[Fate]
    circuit: str = ""  # "", "close", "funds" (open for the funds pause) or "back_off"
    stop_account: bool = False


@dataclass(frozen=True, slots=True)
class Split:
    """Where an e-mail stands in the search for the line that made the gateway refuse a
    whole e-mail: the e-mail the search began with (`root`, of `lines` lines) and the
    halves (0: first, 1: second) taken from it to reach this one. Its requests carry it as
    their signed group, which keeps them apart from every other request."""

    root: str
    lines: int
    path: str = ""

    @classmethod
    def of(cls, group: str, mail_id: str, lines: int) -> Split:
        """The split an e-mail belongs to, or a new one starting from it."""
        root, _, rest = group.partition("/")
        size, _, path = rest.partition("/")
        if root and size.isdigit() and path and set(path) <= {"0", "1"}:
            return cls(root, int(size), path)
        return cls(mail_id, lines)

    @property
    def group(self) -> str:
        return f"{self.root}/{self.lines}/{self.path}"

    def half(self, which: int) -> Split:
        return Split(self.root, self.lines, self.path + str(which))

    @property
    def allowance(self) -> int:
        """The e-mails a split may send while none of them got through: two per halving,
        enough to find one bad line among n (or to separate two), and a margin. A cause
        every line shares (the sender, an option) fails every e-mail, so it ends there."""
        return 2 * math.ceil(math.log2(max(self.lines, 2))) + 4


def after_error(
    reply: Rejected,
    mail_id: str,
    count: int,
    identical_window_s: float,
    split: Split | None = None,
    notes: SplitNotes | None = None,
) -> ReplyPlan:
    number = int(reply.error)
    code = f"gateway_{number}"
    text = f"gateway error {number}: {reply.description}"
    action = reply.action
    if action == Action.fail or (action == Action.find_bad_line and count == 1):
        return ReplyPlan([Fail(code, text, number, mail_id)] * count)
    if action == Action.find_bad_line:
        return _find_bad_line(number, code, text, mail_id, count, split, notes or SplitNotes())
    if action == Action.retry_after_window:
        later = Later(
            identical_window_s,
            code,
            text,
            Status.retrying,
            gateway_error=number,
            mail_id=mail_id,
            refund=True,
        )
        return ReplyPlan([later] * count)
    if action == Action.stop_account:
        later = Later(
            0,
            "account_stopped",
            text,
            Status.deferred,
            gateway_error=number,
            mail_id=mail_id,
            refund=True,
        )
        return ReplyPlan([later] * count, stop_account=True)
    circuit = "funds" if action == Action.pause_account else "back_off"
    # The wait is the circuit's pause, known once it is opened: the caller fills it in.
    later = Later(
        0, code, text, Status.deferred, gateway_error=number, mail_id=mail_id, refund=True
    )
    return ReplyPlan([later] * count, circuit=circuit)


def _find_bad_line(
    number: int,
    code: str,
    text: str,
    mail_id: str,
    count: int,
    split: Split | None,
    notes: SplitNotes,
) -> ReplyPlan:
    """One bad line can make the gateway refuse a whole e-mail: its halves are sent apart,
    so each round halves the suspects and only the bad requests end up failed.

    Whether the cause is one line or what every line shares (the sender, an option) no
    single reply tells: two bad lines fail both halves of a split just as a bad sender
    does. What tells them apart is an e-mail of the split getting through, which a shared
    cause never lets happen. So a split whose e-mails have all been refused stops once it
    has spent its allowance (`Split.allowance`, about 2*log2(n) e-mails), failing its
    remaining requests with the gateway's error; once one got through, the search goes on
    until each bad line is found alone (at most two e-mails per bad line and halving).
    """
    split = split or Split(mail_id, count)
    if not notes.granted:
        why = (
            f"all {notes.failed} e-mails sent to find the bad line were refused alike, so the "
            "cause is what every line shares (the sender or an option), not one line"
        )
        return ReplyPlan([Fail(code, f"{text}; {why}", number, mail_id)] * count)
    middle = count // 2
    note = f"{text}; resending in halves to find the bad line"
    halves = (split.half(0).group, split.half(1).group)
    return ReplyPlan(
        [
            Later(
                0,
                code,
                note,
                Status.retrying,
                group=halves[0 if i < middle else 1],
                gateway_error=number,
                mail_id=mail_id,
                refund=True,
            )
            for i in range(count)
        ]
    )
