"""`phi3v chat`: a multi-turn session in the terminal.

Lines starting with / are commands: /image PATH attaches an image to the next message, /reset forgets
the conversation, /quit leaves. Images stay in the conversation, so later turns can refer to them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from phi3v.errors import Phi3VError

HELP = "commands: /image PATH (attach to your next message), /reset, /quit"


def run_chat(model: Any, settings: Any, attached: list[Any], read_images: Callable[[tuple[str, ...]], list[Any]]) -> None:
    """Read messages from stdin until /quit or end of input, streaming each answer."""
    interactive = sys.stdin.isatty()
    messages: list[dict[str, Any]] = []
    if not settings.quiet:
        click.echo(HELP, err=True)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                messages, attached = [], []
                click.echo("(conversation cleared)", err=True)
            elif cmd == "/image" and arg.strip():
                try:
                    attached += read_images((arg.strip(),))
                    click.echo(f"(attached {arg.strip()}; it goes with your next message)", err=True)
                except (Phi3VError, click.BadParameter) as e:
                    click.echo(f"error: {e.message if isinstance(e, click.BadParameter) else e}", err=True)
            else:
                click.echo(HELP, err=True)
            continue
        turn = [{"type": "image", "image": im} for im in attached] + [{"type": "text", "text": line}]
        attempt = messages + [{"role": "user", "content": turn}]
        if interactive:
            sys.stdout.write("phi3v> ")
        try:
            done = model.run(attempt, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                             **settings.generation())  # fmt: skip
        except Phi3VError as e:  # the conversation is kept as it was; the user can fix and retry
            click.echo(f"\nerror: {e}", err=True)
            continue
        except KeyboardInterrupt:
            click.echo("\n(answer interrupted)", err=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages = attempt + [{"role": "assistant", "content": done.text}]
        attached = []
