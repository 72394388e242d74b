"""Loading and running a saved MindSpore part: `<name>.mindir` (or a split export) as an
`nn.GraphCell`. Imports mindspore and NumPy only (no code generator, no handlers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimm.errors import CheckpointError
from slimm.outdir import plain_name


def load(out_dir: str | Path, name: str, **options):
    """(*inputs) -> [numpy outputs] over `<out_dir>/<name>.mindir` (inputs NumPy arrays or MindSpore
    tensors). No options yet; any given are ignored, as in jax."""
    return load_mindir(Path(out_dir), name)


def to_numpy(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def startup():
    """MindSpore, past its NumPy 2 start-up error (see slimm.frameworks.mindspore)."""
    from slimm.frameworks import mindspore

    return mindspore.startup()


def load_mindir(out_dir: Path, name: str):
    ms = startup()
    name = plain_name(name, out_dir, "part name")
    path = out_dir / f"{name}.mindir"
    if not path.exists() and (out_dir / f"{name}_graph.mindir").exists():
        path = out_dir / f"{name}_graph.mindir"  # split export of a large graph
    if not path.is_file():
        raise CheckpointError(f"{path}: MINDIR file not found; convert the export with the mindspore target")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty MINDIR file")
    try:
        graph = ms.load(str(path))
    except Exception as e:  # noqa: BLE001 - MindSpore raises RuntimeError/ValueError/TypeError by cause
        raise CheckpointError(f"{path}: not a loadable MINDIR file ({type(e).__name__}: {e})") from None
    if graph is None:
        raise CheckpointError(f"{path}: not a loadable MINDIR file")
    cell = ms.nn.GraphCell(graph)
    cell.set_train(False)

    def run(*inputs):
        out = cell(*(x if isinstance(x, ms.Tensor) else ms.Tensor(np.asarray(x, order="C")) for x in inputs))
        if not isinstance(out, (tuple, list)):
            out = (out,)
        return [o.asnumpy() for o in out]

    return run
