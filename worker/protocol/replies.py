"""The gateway's reply e-mails, `OK - <n> SMS, ID - <id>` or `ERROR = <N> (<text>)[, ID - <id>]`,
and what each error number asks of the client (the table in NOTES.md)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class GatewayError(IntEnum):
    parameters = 1
    credentials = 2
    insufficient_funds = 3
    ip_blocked = 4
    date_format = 5
    message_denied = 6
    phone_format = 7
    undeliverable = 8
    duplicate_request = 9


class Action(StrEnum):
    """What the client must do about an error reply."""

    fail = "fail"  # permanent for the whole e-mail
    stop_account = "stop_account"  # permanent; stop sending for the account and alert
    pause_account = "pause_account"  # out of funds: pause, retry later
    back_off = "back_off"  # the IP is blocked: stop everything, back off, probe
    find_bad_line = "find_bad_line"  # one line is bad: split the e-mail to find it
    retry_after_window = "retry_after_window"  # duplicate: wait out the minute


ERROR_ACTIONS: dict[GatewayError, Action] = {
    GatewayError.parameters: Action.fail,
    GatewayError.credentials: Action.stop_account,
    GatewayError.insufficient_funds: Action.pause_account,
    GatewayError.ip_blocked: Action.back_off,
    GatewayError.date_format: Action.fail,
    GatewayError.message_denied: Action.fail,
    GatewayError.phone_format: Action.find_bad_line,
    GatewayError.undeliverable: Action.find_bad_line,
    GatewayError.duplicate_request: Action.retry_after_window,
}

ERRORS_WITH_ID = frozenset(
    {
        GatewayError.insufficient_funds,
        GatewayError.message_denied,
        GatewayError.phone_format,
        GatewayError.undeliverable,
    }
)

DESCRIPTIONS: dict[GatewayError, str] = {
    GatewayError.parameters: "error in parameters",
    GatewayError.credentials: "invalid login or password",
    GatewayError.insufficient_funds: "insufficient funds",
    GatewayError.ip_blocked: "IP address is temporarily blocked",
    GatewayError.date_format: "invalid date format",
    GatewayError.message_denied: "message denied",
    GatewayError.phone_format: "invalid phone number format",
    GatewayError.undeliverable: "message cannot be delivered",
    GatewayError.duplicate_request: "duplicate request",
}


@dataclass(frozen=True, slots=True)
class Accepted:
    sms_count: int
    mail_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    error: GatewayError | int
    description: str
    mail_id: str | None

    @property
    def action(self) -> Action:
        """Unknown numbers are treated as permanent for the e-mail: never a blind resend."""
        if isinstance(self.error, GatewayError):
            return ERROR_ACTIONS[self.error]
        return Action.fail

    @property
    def retryable(self) -> bool:
        return self.action in (Action.pause_account, Action.back_off, Action.retry_after_window)


Reply = Accepted | Rejected


class UnreadableReply(ValueError):
    """Nothing in the e-mail looks like the gateway's answer."""


# Each pattern must match a whole answer line (after surrounding blanks and quote marks are
# stripped): a search inside a line would read "BOOK - 2 SMS, ID - 5" as an answer. The
# description runs to the last ")" that still leaves a valid ending, so a description that
# itself holds parentheses keeps both its text and the ID after it.
_ID = r"((?-i:[A-Za-z0-9._-])+)"  # case-exact: no Kelvin sign for a K
# Numbers of at most 12 digits: int() of thousands of digits raises (and costs).
_OK = re.compile(rf"OK\s*-\s*(\d{{1,12}})\s*SMS\s*,\s*ID\s*-\s*{_ID}", re.IGNORECASE)
_ERROR = re.compile(
    rf"ERROR\s*=\s*(\d{{1,12}})\s*(?:\((.*)\))?\s*(?:,\s*ID\s*-\s*{_ID})?",
    re.IGNORECASE,
)
# A description goes into logs and result events: whatever a reply holds, at most this
# many characters of it, control characters blanked.
DESCRIPTION_LIMIT = 200
_BLANKED = frozenset({"Cc", "Zl", "Zp"})  # control characters, line breaks


def _description(text: str) -> str:
    text = "".join(" " if unicodedata.category(c) in _BLANKED else c for c in text).strip()
    if len(text) > DESCRIPTION_LIMIT:
        text = text[: DESCRIPTION_LIMIT - 1] + "…"
    return text


_QUOTE_MARKS = "\"'`«»“”„"


def _answer_lines(body: str) -> list[str]:
    """Body lines that could be the answer: quoted text and the signature are skipped."""
    lines = []
    for line in body.replace("\r\n", "\n").split("\n"):
        if line.rstrip() == "--":
            break
        stripped = line.strip().strip(_QUOTE_MARKS).strip()
        if stripped and not stripped.startswith(">"):
            lines.append(stripped)
    return lines


def parse_reply(body: str) -> Reply:
    for line in _answer_lines(body):
        ok = _OK.fullmatch(line)
        if ok:
            return Accepted(sms_count=int(ok.group(1)), mail_id=ok.group(2))
        error = _ERROR.fullmatch(line)
        if error:
            number = int(error.group(1))
            known: GatewayError | int = (
                GatewayError(number) if number in GatewayError._value2member_map_ else number
            )
            return Rejected(
                error=known, description=_description(error.group(2) or ""), mail_id=error.group(3)
            )
    raise UnreadableReply("no 'OK - n SMS, ID - id' or 'ERROR = N (...)' line in the reply")


def render_reply(reply: Reply) -> str:
    """The reply as the gateway writes it (the emulator's side)."""
    if isinstance(reply, Accepted):
        return f"OK - {reply.sms_count} SMS, ID - {reply.mail_id}"
    text = f"ERROR = {int(reply.error)} ({reply.description})"
    if reply.mail_id is not None and reply.error in ERRORS_WITH_ID:
        text += f", ID - {reply.mail_id}"
    return text
