"""The mindspore handler table (every op-family module registers into it) and dtype spelling."""

from slimm.convert.registry import Registry

REGISTRY = Registry("mindspore")


def ms_name(np_name: str) -> str:
    """MindSpore's name for a NumPy dtype name (they differ only for bool)."""
    return "bool_" if np_name == "bool" else np_name


def ms_dtype(np_name: str) -> str:
    """Code for the MindSpore dtype of a NumPy dtype name."""
    return f"mindspore.{ms_name(np_name)}"
