"""The SMS Center gateway's SMTP interface as pure code: no sockets, no clocks, no files.

Encoding of send e-mails (`mail`), their fields (`fields`), recipients (`recipients`),
SMS part counting (`segments`), the gateway's replies (`replies`) and the reverse
parsing of a send e-mail (`decode`, used by the emulator).
"""
