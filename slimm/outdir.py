"""The files of a model directory (export, quantized export, conversion, demo checkpoint): names read
from a manifest checked to stay inside their directory; `--out` checked before any work, the
directory built in a temporary sibling and renamed into place only when complete, and its files given
the modes the user's umask gives ordinary files. Standard library only: the run-time loaders use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimm.errors import CheckpointError, InputError


def plain_name(name: Any, where: str | Path, what: str) -> str:
    """`name` if it is a plain file name inside `where`'s directory; else a CheckpointError naming
    `where` (a manifest or a directory) and `what` (the entry): a hostile manifest must not make us
    read or write elsewhere."""
    ok = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
        and ":" not in name[:2]  # a Windows drive, C:x
    )
    if not ok:
        raise CheckpointError(
            f"{where}: {what} names {name!r}, which is not a plain file name inside its directory "
            "(no folders, no '..', not absolute)"
        )
    return name


def umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as `open` / `mkdir` make them: safetensors,
    onnx's external data and tempfile all write 0600 / 0700, unreadable to the rest of a group."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def is_slimm_dir(path: Path) -> bool:
    """A directory one of our commands wrote (an export, a conversion, a demo checkpoint)."""
    try:
        fmt = json.loads((path / "manifest.json").read_text()).get("format", "")
        return isinstance(fmt, str) and fmt.startswith("slimm-")
    except (OSError, ValueError, AttributeError):
        return (path / "README.md").is_file() and "SliMM demo checkpoint" in (path / "README.md").read_text()


def check_out_dir(out: str | Path, *, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output directory that is a file, cannot be created, lies in (or is)
    `source`, or holds something other than a previous slimm output (unless `overwrite`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out} is a file")
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise InputError(f"output directory {out} is inside the model directory {source}: choose another")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not is_slimm_dir(out):
        raise InputError(
            f"output directory {out} is not empty and holds no slimm export: pass --overwrite "
            "(overwrite=True) to replace it whole"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output directory {out} cannot be created ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"output directory {out} cannot be created: {out.parent} is not writable")
    return out


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; when the block completes, it replaces `out` whole
    (no file of what was there before remains). A failed or killed run leaves `out` as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # a sibling on the same file system: rename moves it
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
