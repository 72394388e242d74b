"""Loading and running a saved JAX part: the jax.export artifact and its safetensors weights.
Imports jax and NumPy only (no code generator, no handlers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimm.errors import CheckpointError
from slimm.outdir import plain_name


def enable_x64() -> None:
    """int64 indices and sizes stay int64 (without x64, JAX narrows them to int32 and INT64_MAX
    slice ends wrap to -1). Float constants are typed explicitly, so float32 stays float32."""
    import jax

    jax.config.update("jax_enable_x64", True)


def load_params(path: Path) -> dict:
    """Weights as JAX arrays, one tensor at a time in ordinary memory (see slimm.tensorfile)."""
    import jax

    from slimm.tensorfile import iter_tensors

    return {key: jax.device_put(arr) for key, _, arr in iter_tensors(path)}


class JaxPart:
    """A deserialized part: jit-compiled once per distinct input shape (counted in `compilations`)."""

    def __init__(self, out_dir: Path, name: str) -> None:
        import jax
        from jax import export

        enable_x64()
        name = plain_name(name, out_dir, "part name")
        blob, weights = out_dir / f"{name}.jaxexport", out_dir / f"{name}.safetensors"
        for f in (blob, weights):
            if not f.exists():
                raise CheckpointError(f"{f}: file of converted part {name} is missing")
        try:
            self.exported = export.deserialize(bytearray(blob.read_bytes()))
        except Exception as e:  # noqa: BLE001 - flatbuffer / version errors of several kinds
            raise CheckpointError(
                f"{blob}: not a readable jax.export artifact ({type(e).__name__}: {e})"
            ) from None
        try:
            self.params = load_params(weights)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{weights}: unreadable weights ({type(e).__name__}: {e})") from None
        self.fn = jax.jit(self.exported.call)
        self.signatures: set = set()

    @property
    def compilations(self) -> int:
        return len(self.signatures)

    def __call__(self, *inputs):
        self.signatures.add(tuple((tuple(x.shape), str(x.dtype)) for x in inputs))
        return list(self.fn(self.params, *inputs))


def load(out_dir: str | Path, name: str, **options) -> JaxPart:
    """A saved part as a callable (*inputs) -> [JAX arrays]; no options yet (any given are ignored)."""
    return JaxPart(Path(out_dir), name)


def to_numpy(x) -> np.ndarray:
    return np.asarray(x)
