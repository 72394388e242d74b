"""Files of a conversion: names read from a manifest checked to stay inside their directory, the
output built in a sibling directory and moved into place whole, modes that follow the umask.
Standard library only: the run-time loaders use it too."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from slimm.errors import CheckpointError


def plain_name(name, where: str | Path, what: str) -> str:
    """`name` if it is a plain file name inside its directory (no path separator, not absolute, not
    `.` or `..`); CheckpointError naming `where` (the manifest or directory) and the entry otherwise."""
    ok = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
    )
    if not ok:
        raise CheckpointError(f"{where}: {what} {name!r} is not a plain file name inside the directory")
    return name


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Every file under `root` 0666 and every directory 0777, less the umask, as a plain `open` or
    `mkdir` makes them: some writers (safetensors, MindSpore's export) leave 0600 / 0400 files."""
    mask = current_umask()
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~mask)


def fresh_sibling(out: Path, tag: str) -> Path:
    """A new empty directory beside `out` (same file system: a rename moves it into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = out.parent / f".{out.name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()  # mode 0777 less the umask, like any directory
            return path
        except FileExistsError:
            continue


def move_into_place(built: Path, out: Path) -> None:
    """Replace `out` (absent, or a directory the caller agreed to replace) by `built`: the old
    directory is renamed aside first and removed last, so `out` is never half-written."""
    old = None
    if out.exists() or out.is_symlink():
        old = fresh_sibling(out, "old")
        old.rmdir()
        os.replace(out, old)
    os.replace(built, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
