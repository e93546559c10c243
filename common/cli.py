"""What the three command-line tools share."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def print_error(console: Console, message: object) -> None:
    """Print ``error: MESSAGE``; the message is text, never rich markup (it may hold ``[table]`` names)."""
    console.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)
