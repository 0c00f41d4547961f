"""A gateway emulator: an SMTP server that behaves like the SMS Center gateway's e-mail
interface (NOTES.md), for tests and for running the worker without the real gateway."""

from .config import EmulatorConfig
from .faults import Faults
from .records import MailRecord
from .rules import Delivery, Flood
from .server import Emulator

__all__ = ["Delivery", "Emulator", "EmulatorConfig", "Faults", "Flood", "MailRecord"]
