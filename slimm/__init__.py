"""SliMM inference: one model, five frameworks, one generation loop."""

from slimm.errors import BackendUnavailable, CheckpointError, InputError, SliMMError

__version__ = "0.1.0"

__all__ = ["load", "SliMMError", "CheckpointError", "InputError", "BackendUnavailable", "__version__"]


def load(path, backend: str = "torch", **kwargs):
    """Load a model directory (or Hugging Face hub id `owner/name`) with the named backend; returns an object with `generate(...)`."""
    from slimm.backends import load_backend

    return load_backend(backend, path, **kwargs)
