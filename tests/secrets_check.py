"""Where a secret could have been written down: the files under some folders that contain it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def files_containing(secret: str, paths: Iterable[str | Path]) -> list[str]:
    """Every regular file at or under `paths` whose bytes contain `secret` (links are not followed, an
    unreadable file is skipped): a test of "never written anywhere" greps the places a run writes to."""
    found = []
    needle = secret.encode()
    for top in map(Path, paths):
        for p in [top] if top.is_file() else top.rglob("*"):
            try:
                if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                    found.append(str(p))
            except OSError:
                continue
    return found
