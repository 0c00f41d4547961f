"""`smsc-worker emulator`: the gateway emulator as a stand-alone SMTP server."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from .config import DEFAULT_GATEWAY_ADDRESS, EmulatorConfig
from .server import Emulator

DEFAULT_PORT = 8025


def _accounts(values: list[str]) -> dict[str, str]:
    accounts = {}
    for value in values:
        login, sep, password = value.partition(":")
        if not sep or not login or not password:
            raise typer.BadParameter(f"{value!r} is not LOGIN:PASSWORD", param_hint="--account")
        accounts[login] = password
    return accounts


def emulator_command(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one (printed)."),
    ] = DEFAULT_PORT,
    gateway_address: Annotated[
        str, typer.Option(help="The gateway's address: mail to any other RCPT gets 550.")
    ] = DEFAULT_GATEWAY_ADDRESS,
    account: Annotated[
        list[str] | None,
        typer.Option(
            metavar="LOGIN:PASSWORD",
            help="An account the gateway knows (error 2 otherwise). Repeatable. "
            "Default, with no --account and no --api-key: demo:demo.",
        ),
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY",
            help="An API key, accepted as the password when the login is empty. Repeatable. "
            "Default, with no --account and no --api-key: demo.",
        ),
    ] = None,
    balance: Annotated[
        int | None,
        typer.Option(min=0, help="SMS parts on the balance (error 3 beyond). Default: unlimited."),
    ] = None,
    deny_sender: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="A sender name that gets error 6. Repeatable."),
    ] = None,
    deny_word: Annotated[
        list[str] | None,
        typer.Option(
            metavar="WORD", help="A word that gets a text error 6 (case-insensitive). Repeatable."
        ),
    ] = None,
    undeliverable: Annotated[
        list[str] | None,
        typer.Option(metavar="NUMBER", help="A recipient that gets error 8. Repeatable."),
    ] = None,
    relay: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="SMTP server that reply e-mails are sent through. Default: no replies.",
        ),
    ] = None,
    relay_lmtp: Annotated[
        bool,
        typer.Option(
            "--relay-lmtp",
            help="--relay is an LMTP server (a Dovecot): replies go straight into its mailboxes.",
        ),
    ] = False,
    reply_from: Annotated[
        str, typer.Option(help="From address of reply e-mails.")
    ] = DEFAULT_GATEWAY_ADDRESS,
    reply_charset: Annotated[
        str,
        typer.Option(
            help="Charset of reply e-mails: utf-8 (English, declared), or cp1251 / koi8-r "
            "(Russian descriptions, no charset declared)."
        ),
    ] = "utf-8",
    latency: Annotated[
        float, typer.Option(min=0, help="Seconds to wait before answering DATA.")
    ] = 0.0,
    record: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Append every delivered message to FILE as a JSON line."),
    ] = None,
    duplicate_window: Annotated[
        float, typer.Option(min=0, help="Seconds within which identical requests are counted.")
    ] = 60.0,
    identical_copies: Annotated[
        int, typer.Option(min=1, help="Identical requests allowed per window (error 9 beyond).")
    ] = 1,
    streak_limit: Annotated[
        int,
        typer.Option(min=1, help="Messages one subscriber gets in a streak; more are held back."),
    ] = 50,
    streak_gap: Annotated[
        float, typer.Option(min=0, help="Seconds of silence that end a subscriber's streak.")
    ] = 120.0,
    block_after_errors: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Errors from one IP within --block-window that block it (error 4). "
            "Default: never block.",
        ),
    ] = None,
    block_window: Annotated[
        float, typer.Option(min=0, help="Seconds over which errors are counted for blocking.")
    ] = 60.0,
    block_for: Annotated[
        float, typer.Option(min=0, help="Seconds a blocked IP keeps getting error 4.")
    ] = 300.0,
) -> None:
    """Run an SMTP server that behaves like the SMS Center gateway, until SIGINT or SIGTERM.

    Send e-mails get the gateway's checks; its OK and ERROR answers go out via --relay.
    """
    credentials: dict[str, object] = {}
    if account or api_key:
        credentials = {"accounts": _accounts(account or []), "api_keys": frozenset(api_key or ())}
    try:
        config = EmulatorConfig(
            host=host,
            port=port,
            gateway_address=gateway_address,
            balance=balance,
            denied_senders=frozenset(deny_sender or ()),
            denied_words=frozenset(deny_word or ()),
            undeliverable=frozenset(undeliverable or ()),
            reply_relay=relay,
            reply_lmtp=relay_lmtp,
            reply_from=reply_from,
            reply_charset=reply_charset,
            latency_s=latency,
            record_path=record,
            duplicate_window_s=duplicate_window,
            identical_copies=identical_copies,
            streak_limit=streak_limit,
            streak_gap_s=streak_gap,
            block_after_errors=block_after_errors,
            block_window_s=block_window,
            block_for_s=block_for,
            **credentials,
        )
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"smsc-worker emulator: invalid options:\n{problems}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # aiosmtpd logs every connection and command at INFO; the emulator logs each e-mail.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    asyncio.run(_serve(config))


async def _serve(config: EmulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Emulator(config) as emulator:
        relay = "{}:{}".format(*config.reply_relay) if config.reply_relay else "none"
        typer.echo(
            f"gateway emulator listening on {emulator.host}:{emulator.port} "
            f"for <{config.gateway_address}>, replies via {relay}"
        )
        await stop.wait()
    typer.echo("gateway emulator stopped")
