"""Helpers shared by test modules: SMTP sinks, a gateway emulator wired to one, a clock."""
