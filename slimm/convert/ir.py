"""The converter's intermediate representation: values, nodes and the folded program a target
emits code for, with `Sym` (an integer known only at run time, as code). NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimm.errors import CheckpointError


class ConversionError(CheckpointError):
    """An ONNX graph that this converter cannot translate (op, opset, node named)."""


class Sym:
    """An integer known only at run time, as a code expression (e.g. `d0_1` or `(d0_1 * 4)`)."""

    __slots__ = ("code",)

    def __init__(self, code: str) -> None:
        self.code = code

    def __repr__(self) -> str:
        return f"Sym({self.code})"

    @staticmethod
    def _code(x) -> str:
        return x.code if isinstance(x, Sym) else str(int(x))

    def _bin(self, other, op: str, rev: bool = False) -> Sym:
        a, b = (self._code(other), self.code) if rev else (self.code, self._code(other))
        return Sym(f"({a} {op} {b})")

    def __add__(self, o):
        return self if (not isinstance(o, Sym) and int(o) == 0) else self._bin(o, "+")

    def __radd__(self, o):
        return self if int(o) == 0 else self._bin(o, "+", True)

    def __sub__(self, o):
        return self if (not isinstance(o, Sym) and int(o) == 0) else self._bin(o, "-")

    def __rsub__(self, o):
        return self._bin(o, "-", True)

    def __mul__(self, o):
        return self if (not isinstance(o, Sym) and int(o) == 1) else self._bin(o, "*")

    def __rmul__(self, o):
        return self if int(o) == 1 else self._bin(o, "*", True)

    def __floordiv__(self, o):
        return self if (not isinstance(o, Sym) and int(o) == 1) else self._bin(o, "//")

    def __rfloordiv__(self, o):
        return self._bin(o, "//", True)

    def __neg__(self):
        return Sym(f"(-{self.code})")

    def __eq__(self, o):  # identity of expressions only; anything else is undecidable here
        if isinstance(o, Sym) and o.code == self.code:
            return True
        raise FoldError(f"cannot compare run-time size {self.code} with {o!r} at conversion time")

    def __hash__(self) -> int:
        return hash(self.code)

    def __int__(self):
        raise FoldError(f"run-time size {self.code} used where a constant is needed")

    __index__ = __int__


class FoldError(Exception):
    """A node cannot be evaluated at conversion time: it stays a runtime node."""


@dataclass
class Value:
    """An ONNX value: static (np array, maybe of Syms) or a runtime tensor held in a variable."""

    name: str
    var: str | None = None  # code variable of a runtime tensor
    static: np.ndarray | None = None
    dtype: str | None = None  # numpy dtype name of a runtime tensor
    shape: tuple | None = None  # ints and Syms
    weight: bool = False  # a runtime tensor that is a stored weight
    # ONNX shape inference's symbolic size names ("batch", "2*seq") where it gives them: two
    # tensors whose size carries the same name have the same size at run time
    dim_names: tuple | None = None

    @property
    def is_static(self) -> bool:
        return self.static is not None


@dataclass
class Node:
    op: str
    name: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any]


@dataclass
class Program:
    """What a target emits code for: inputs, weights, runtime nodes in order, outputs."""

    name: str
    opset: int
    inputs: list[Value]
    outputs: list[Value]
    weights: dict[str, np.ndarray]  # var -> array
    nodes: list[Node]
    dims: dict[str, tuple[str, int]] = field(default_factory=dict)  # dim variable -> (input var, axis)
    taken: set[str] = field(default_factory=set)  # every variable name in use (see safe_var)


ONNX_TO_NP = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


DIM_CALL = "__dim__"  # __dim__(var, axis): a target replaces it with its own way to read a size


MAX_NAME = 48  # characters of an ONNX name kept in a variable name (the rest is dropped)


def safe_var(name: str, taken: set[str], prefix: str = "v_") -> str:
    """A new Python identifier for an ONNX name: `prefix` + its ASCII letters and digits (anything
    else, non-ASCII letters included, becomes `_`), shortened, and numbered until unused in `taken`.
    Never a keyword (the prefix), never two ONNX names on one variable."""
    base = prefix + "".join(c if (c.isascii() and c.isalnum()) else "_" for c in str(name)[:MAX_NAME])
    var, i = base, 1
    while var in taken:
        i += 1
        var = f"{base}_{i}"
    taken.add(var)
    return var
