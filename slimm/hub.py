"""Model locations as users have them: a local directory, or a Hugging Face hub id (`owner/name`)
resolved through huggingface_hub's cache (`HF_HOME` / `HF_HUB_CACHE`), downloaded when online.

Every huggingface_hub failure becomes one CheckpointError / InputError naming the id and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimm.errors import CheckpointError, InputError

_TRUE = {"1", "ON", "YES", "TRUE"}


def looks_like_hub_id(name: str | os.PathLike) -> bool:
    """`owner/name` written as such: one slash, not a path that starts at /, ., ~ or uses backslashes."""
    s = os.fspath(name)
    return s.count("/") == 1 and not s.startswith(("/", ".", "~")) and "\\" not in s


def download_command(repo_id: str, local_dir: str | Path | None = None) -> str:
    """The shell command that fetches `repo_id` with the installed huggingface_hub's own CLI."""
    try:
        from importlib.metadata import version

        major = int(version("huggingface_hub").split(".")[0])
    except Exception:  # noqa: BLE001 - not installed or odd version: the long-standing name
        major = 0
    cmd = f"{'hf' if major >= 1 else 'huggingface-cli'} download {repo_id}"
    return cmd + (f" --local-dir {local_dir}" if local_dir is not None else "")


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment now (not at its import)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: the cache only, no network."""
    env = os.environ
    return (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE


def validate_hub_id(repo_id: str) -> None:
    """Raise InputError unless `repo_id` is a valid `owner/name` by huggingface_hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(
            f"{repo_id!r} is not a local directory nor a valid Hugging Face repo id ({e})"
        ) from None


def _cache_problem(repo_id: str, cache: Path) -> str:
    """Why the cache cannot serve `repo_id`, in words."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text(encoding="utf-8", errors="replace").strip()
        if not (repo / "snapshots" / rev).is_dir():
            return f"the cache {repo} is incomplete: refs/main names snapshot {rev!r}, which is missing"
    return f"it is not in the Hugging Face cache {cache}"


def resolve_hub_id(repo_id: str) -> Path:
    """The snapshot directory of hub repo `repo_id` (revision main): from the cache, else downloaded
    (unless HF_HUB_OFFLINE). Raises InputError for an invalid id, CheckpointError when unavailable."""
    validate_hub_id(repo_id)
    from huggingface_hub import snapshot_download

    cache, offline = hub_cache_dir(), hub_offline()
    fetch = f"fetch it with `{download_command(repo_id)}`"
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one message, never a traceback
        kind = type(e).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            reason = "the Hugging Face Hub has no such repository, or it needs a login (`hf auth login`)"
        elif kind == "RevisionNotFoundError":
            reason = "the Hugging Face Hub repository has no revision main"
        else:
            reason = _cache_problem(repo_id, cache)
            if offline:
                reason += " and HF_HUB_OFFLINE is set"
            elif kind != "LocalEntryNotFoundError":
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                reason += f", and the download failed ({kind}: {first})"
            else:
                reason += ", and the Hugging Face Hub could not be reached"
        raise CheckpointError(f"model {repo_id!r}: {reason}; {fetch}") from None


def resolve_model(path_or_id: str | os.PathLike) -> Path:
    """A model location as a local directory: an existing directory as is, an `owner/name` hub id
    through the Hugging Face cache; anything else unchanged (the loader then names what is missing)."""
    path = Path(path_or_id).expanduser()
    if path.exists() or not looks_like_hub_id(path_or_id):
        return path
    return resolve_hub_id(os.fspath(path_or_id))
