"""The TOML people write (schemas, policies, sweeps, federation.toml, ``--config``): read once, clear errors."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

from fedsilo.common.errors import ConfigError, FedsiloError


def read_toml(path: Path | str, what: str, *, error: type[FedsiloError] = ConfigError) -> dict[str, Any]:
    """The file's tables and values; ``what`` names the kind of file in errors ("policy file").

    Every problem (missing, unreadable, not TOML) raises ``error`` naming the file.
    """
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read the {what} ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML ({err}); see the {what} format in the README") from None


def parse_assignments(text: str, what: str) -> dict[str, Any]:
    """``'key=value key2=value2'`` (shell quoting) with TOML values; a value that is not TOML is a string."""
    out: dict[str, Any] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: {item!r} is not key=value")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def toml_value(value: Any) -> str:
    """A scalar as a TOML value (``inf`` for infinity)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return json.dumps(value)
