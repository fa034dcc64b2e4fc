"""Where the config tree is: `conf/` at the repository's top, reached through the package's `conf` link (a copy of
the tree in an installed wheel), so a source checkout and an installed package find it the same way."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"


def conf_file(*parts: str) -> Path:
    """A file of the config tree, e.g. `conf_file("constitution", "default.yaml")`."""
    return CONF_DIR.joinpath(*parts)
