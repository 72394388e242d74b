"""Op handlers by (op type, opset) for each target framework, with floor lookup: a model of opset
N uses the newest handler registered for a version <= N, as ONNX's reference evaluator does.
"""

from __future__ import annotations

from collections.abc import Callable

from slimm.convert.ir import ConversionError

Handler = Callable  # (emitter, node) -> None


class Registry:
    def __init__(self, target: str) -> None:
        self.target = target
        self.handlers: dict[str, list[tuple[int, Handler]]] = {}

    def register(self, *ops: str, since: int = 1):
        """Decorator: `@REGISTRY.register("Add", "Sub", since=7)`. Registering twice raises."""

        def deco(fn: Handler) -> Handler:
            for op in ops:
                versions = self.handlers.setdefault(op, [])
                if any(v == since for v, _ in versions):
                    raise ValueError(f"{self.target}: handler for {op} opset {since} registered twice")
                versions.append((since, fn))
                versions.sort(key=lambda x: x[0])
            return fn

        return deco

    def lookup(self, op: str, opset: int, node: str) -> Handler:
        found = [fn for v, fn in self.handlers.get(op, []) if v <= opset]
        if not found:
            have = [v for v, _ in self.handlers.get(op, [])]
            detail = f" (handlers exist from opset {min(have)})" if have else ""
            raise ConversionError(
                f"{self.target}: no converter for op {op} at opset {opset}{detail}, needed by node {node!r}"
            )
        return found[-1]

    def table(self) -> dict[str, list[int]]:
        return {op: [v for v, _ in vs] for op, vs in sorted(self.handlers.items())}
