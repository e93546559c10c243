"""Reading the TOML files people write (policies, sweeps), with errors that name the file and the fix."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from common.errors import ConfigError


def read_toml(path: Path | str, what: str) -> dict[str, Any]:
    """The file's tables and values; ``what`` names the kind of file in errors ("policy file")."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}); see the {what} format in the README") from None
