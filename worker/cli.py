"""The `smsc-worker` command line."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Annotated

import aio_pika
import typer
from pydantic import ValidationError

from worker.contract import ResultEvent, SendRequest, Status
from worker.emulator.command import emulator_command
from worker.errors import ConfigurationError
from worker.lanes import Lane
from worker.logs import configure_logging
from worker.runner import run
from worker.schemas import render_all, write_all
from worker.settings import Settings

app = typer.Typer(
    help="Bridge RabbitMQ send requests to the SMS Center gateway's SMTP interface.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("emulator")(emulator_command)

FINAL_STATUSES = frozenset({Status.accepted, Status.failed, Status.rejected})


def load_settings() -> Settings:
    """Settings from the environment, or exit naming every bad setting."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "\n".join(
            f"  SMSC_{'__'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        typer.echo(f"smsc-worker: invalid configuration:\n{problems}", err=True)
        raise typer.Exit(2) from None


@app.command("config")
def config_command() -> None:
    """Print the effective configuration as JSON, secrets masked."""
    typer.echo(json.dumps(load_settings().masked(), indent=2))


@app.command("run")
def run_command(
    emulator: Annotated[
        bool,
        typer.Option(
            "--emulator",
            help="Also run the gateway emulator in-process and point the worker at it: "
            "the whole loop on one machine with only RabbitMQ.",
        ),
    ] = False,
) -> None:
    """Run the worker until SIGTERM or SIGINT, then drain and stop."""
    settings = load_settings()
    configure_logging(settings)
    try:
        asyncio.run(run(settings, with_emulator=emulator))
    except ConfigurationError as exc:
        typer.echo(f"smsc-worker: invalid configuration: {exc.message}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"smsc-worker: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("send")
def send_command(
    to: Annotated[list[str], typer.Option("--to", help="Recipient; repeat for more.")],
    text: Annotated[str, typer.Option("--text", help="Message text.")],
    channel: Annotated[str | None, typer.Option(help="sms, telegram, email, ...")] = None,
    sender: Annotated[str | None, typer.Option(help="Registered sender name.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key (random).")] = None,
    priority: Annotated[
        Lane, typer.Option(help="The lane: the queue the request is published to.")
    ] = Lane.normal,
    wait: Annotated[bool, typer.Option("--wait", help="Print result events until final.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a final event.")] = 60.0,
) -> None:
    """Publish one send request (and with --wait, print its result events)."""
    settings = load_settings()
    try:
        request = SendRequest.model_validate(
            {
                "request_id": request_id or uuid.uuid4().hex,
                "to": to,
                "text": text,
                "channel": channel,
                "sender": sender,
            }
        )
    except ValidationError as exc:
        typer.echo(f"smsc-worker: invalid request: {exc}", err=True)
        raise typer.Exit(2) from None
    final = asyncio.run(_send(settings, request, priority, wait, timeout))
    if wait and final is None:
        typer.echo(f"smsc-worker: no final result within {timeout:.0f} s", err=True)
        raise typer.Exit(3)
    if final is not None and final.status != Status.accepted:
        raise typer.Exit(1)


async def _send(
    settings: Settings, request: SendRequest, lane: Lane, wait: bool, timeout_s: float
) -> ResultEvent | None:
    connection = await aio_pika.connect(settings.amqp.url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True) if wait else None
        await channel.default_exchange.publish(
            aio_pika.Message(
                request.model_dump_json(exclude_none=True).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=request.request_id,
                correlation_id=request.request_id,
                reply_to=replies.name if replies else None,
            ),
            routing_key=settings.amqp.queue(lane),
        )
        typer.echo(
            f"published request {request.request_id} to {settings.amqp.queue(lane)}", err=True
        )
        if replies is None:
            return None
        try:
            async with asyncio.timeout(timeout_s), replies.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    event = ResultEvent.model_validate_json(message.body)
                    typer.echo(f"{event.status.value}\t{message.body.decode()}")
                    if event.status in FINAL_STATUSES:
                        return event
        except TimeoutError:
            return None
    return None


@app.command("schemas")
def schemas_command(
    directory: Annotated[Path, typer.Argument(help="Where to write them.")] = Path("schemas"),
    check: Annotated[
        bool, typer.Option("--check", help="Fail if the files differ from the code.")
    ] = False,
) -> None:
    """Write the JSON Schemas and the AsyncAPI document of the message contract."""
    if check:
        stale = [
            name
            for name, text in render_all().items()
            if not (directory / name).exists()
            or (directory / name).read_text(encoding="utf-8") != text
        ]
        if stale:
            typer.echo(f"out of date in {directory}: {', '.join(stale)}", err=True)
            raise typer.Exit(1)
        return
    for path in write_all(directory):
        typer.echo(str(path))


def main() -> None:
    app()
