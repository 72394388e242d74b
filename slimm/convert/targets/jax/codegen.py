"""JAX code generation: a `forward(params, *inputs)` function per part, saved with jax.export as
serialized StableHLO with symbolic shapes; weights beside it as safetensors (passed in, not baked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimm.convert.emitter import Target, header, np_literal
from slimm.convert.ir import Program
from slimm.convert.targets.jax import elementwise, nn, reduce, tensor  # noqa: F401  (register the handlers)
from slimm.convert.targets.jax.registry import REGISTRY
from slimm.convert.targets.jax.runtime import enable_x64


class JaxTarget(Target):
    name = "jax"
    registry = REGISTRY
    symbolic_dims = True

    def dim(self, var: str, axis: int) -> str:
        return f"{var}.shape[{axis}]"

    def weight(self, var: str) -> str:
        return f"params[{var!r}]"

    def constant(self, arr: np.ndarray) -> str:
        return f"jnp.asarray({np_literal(arr)})"

    def sizes_tensor(self, codes: list[str], shape: tuple) -> str:
        return f"jnp.array([{', '.join(codes)}], dtype=jnp.int64).reshape({tuple(shape)!r})"

    def module(self, prog: Program, body: list[str], dim_lines: list[str]) -> str:
        args = ", ".join(v.var for v in prog.inputs)
        outs = ", ".join(v.var for v in prog.outputs)
        lines = [
            *header(prog),
            "",
            "import jax",
            "import jax.numpy as jnp",
            "import numpy as np",
            "from jax import lax",
            "",
            "",
            f"def forward(params, {args}):",
        ]
        lines += ["    " + ln for ln in dim_lines + body]
        lines.append(f"    return ({outs},)")
        return "\n".join(lines) + "\n"

    def runner(self, module, weights):
        import jax

        enable_x64()
        params = {k: jax.numpy.asarray(v) for k, v in weights.items()}
        fn = jax.jit(module.forward)

        def run(*inputs):
            return [np.asarray(o) for o in fn(params, *inputs)]

        return run

    def save(self, module, weights, inputs, out_dir, name):
        import jax
        from jax import export
        from safetensors.numpy import save_file

        enable_x64()
        scope = export.SymbolicScope()  # one scope: a name means the same size in every input
        specs = []
        for _, dtype, dims in inputs:
            shape = export.symbolic_shape(", ".join(str(d) for d in dims), scope=scope) if dims else ()
            specs.append(jax.ShapeDtypeStruct(shape, np.dtype(dtype)))
        pspec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
        exported = export.export(jax.jit(module.forward))(pspec, *specs)
        out_dir = Path(out_dir)
        (out_dir / f"{name}.jaxexport").write_bytes(exported.serialize())
        save_file(
            {k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out_dir / f"{name}.safetensors")
        )
        return [f"{name}.jaxexport", f"{name}.safetensors"]


TARGET = JaxTarget()
