"""The shared code generator: from a folded Program to Python source in a target framework's idiom.

A target (one per framework) says how to read a run-time size, how to write a constant and a
weight, and how to wrap the body into a module; its registry's handlers turn each runtime node
into lines of code through an `Emitter`.
"""

from __future__ import annotations

import re

import numpy as np

from slimm.convert.ir import DIM_CALL, ConversionError, Node, Program, Sym, Value
from slimm.convert.registry import Registry

_DIM_RE = re.compile(rf"{DIM_CALL}\((\w+), (\d+)\)")


class Target:
    """What a framework contributes to code generation. Subclasses fill these in."""

    name: str = ""
    registry: Registry

    def dim(self, var: str, axis: int) -> str:
        """Code for size `axis` of runtime tensor `var`."""
        raise NotImplementedError

    def weight(self, var: str) -> str:
        """Code for a stored weight."""
        raise NotImplementedError

    def constant(self, arr: np.ndarray) -> str:
        """Code for a small static array used as a tensor."""
        raise NotImplementedError

    def sizes_tensor(self, codes: list[str], shape: tuple) -> str:
        """Code for an int64 tensor built from run-time sizes (rare: most sizes stay Python ints)."""
        raise NotImplementedError

    def module(self, prog: Program, body: list[str], dim_lines: list[str]) -> str:
        """The whole generated source file."""
        raise NotImplementedError

    symbolic_dims = False  # save() wants dim names ("batch", "4*tokens") rather than None

    def save(self, module, weights: dict[str, np.ndarray], inputs: list, out_dir, name: str) -> list[str]:
        """Write the deployable artifact of one part; returns the file names written.
        `inputs`: (name, dtype name, dims) per input, dims ints and dynamic dims (None, or
        names when `symbolic_dims`)."""
        raise NotImplementedError

    def runner(self, module, weights: dict[str, np.ndarray]):
        """An eager callable over NumPy arrays for an imported generated module: (*inputs) -> [outputs].
        Used by per-op tests and `--validate`; deployment goes through the saved artifacts."""
        raise NotImplementedError


def _is(d, k: int) -> bool:
    return not isinstance(d, Sym) and int(d) == k


def _same(a, b) -> bool:
    """Equal at conversion time (ints, or the same run-time expression)."""
    if isinstance(a, Sym) or isinstance(b, Sym):
        return isinstance(a, Sym) and isinstance(b, Sym) and a.code == b.code
    return int(a) == int(b)


def np_literal(arr: np.ndarray) -> str:
    """A NumPy expression that rebuilds a small numeric array exactly."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        return f"np.array({arr.tolist()!r}, dtype=np.bool_)"
    if arr.dtype.kind == "f":
        # repr of a Python float round-trips exactly; go through float64 and back
        return f"np.array({arr.astype(np.float64).tolist()!r}, dtype=np.{arr.dtype.name})"
    return f"np.array({arr.tolist()!r}, dtype=np.{arr.dtype.name})"


class Emitter:
    """Handlers write code through this: inputs as code, static values, outputs as assignments."""

    def __init__(self, target: Target, prog: Program) -> None:
        self.target = target
        self.prog = prog
        self.lines: list[str] = []
        self.node: Node | None = None
        self.used_weights: set[str] = set()  # what the generated code reads; the rest is not saved

    # ---- reading inputs ---------------------------------------------------------------------------
    def sym(self, x) -> str:
        """Code for an int or a run-time size."""
        code = x.code if isinstance(x, Sym) else str(int(x))
        return _DIM_RE.sub(lambda m: self.target.dim(m.group(1), int(m.group(2))), code)

    def t(self, v: Value | None) -> str:
        """Code for an input as a tensor (runtime variable, weight, or constant)."""
        if v is None:
            raise self.error("a required input is missing")
        if v.weight:
            self.used_weights.add(v.var)
            return self.target.weight(v.var)
        if v.var is not None and not v.is_static:
            return v.var
        arr = v.static
        if arr.dtype == object:  # sizes known only at run time, used as a tensor
            return self.target.sizes_tensor([self.sym(x) for x in arr.reshape(-1)], arr.shape)
        return self.target.constant(arr)

    def weight_transposed(self, v: Value) -> str:
        """Code for a 2-D weight stored transposed at conversion time: (K, N) -> (N, K) rows, for
        targets whose matrix-vector kernels stream (N, K) weights faster. Stored once however many
        nodes ask; the (K, N) original is dropped unless some other node reads it."""
        name = f"{v.var}_t"
        if name not in self.prog.weights:
            self.prog.weights[name] = np.ascontiguousarray(self.prog.weights[v.var].T)
        self.used_weights.add(name)
        return self.target.weight(name)

    def static(self, v: Value | None, what: str) -> np.ndarray:
        if v is None or not v.is_static:
            raise self.error(f"{what} must be known at conversion time (it is computed at run time here)")
        return v.static

    def ints(self, v: Value | None, what: str) -> list:
        """A static int vector, entries ints or Syms."""
        return [x if isinstance(x, Sym) else int(x) for x in self.static(v, what).reshape(-1)]

    def shape_code(self, dims: list) -> str:
        return "(" + "".join(self.sym(d) + ", " for d in dims) + ")"

    def has(self, i: int) -> bool:
        return len(self.node.inputs) > i and self.node.inputs[i] is not None

    # ---- ONNX semantics every target shares ------------------------------------------------------------
    def rank(self, v: Value) -> int:
        if v.is_static:
            return v.static.ndim
        if v.shape is None:
            raise self.error(f"the rank of {v.name!r} is unknown at conversion time")
        return len(v.shape)

    def dims(self, v: Value) -> list:
        """Sizes of a tensor as ints / Syms (sizes unknown here are read at run time)."""
        if v.is_static:
            return list(v.static.shape)
        self.rank(v)  # a clear error when even the rank is unknown
        return [Sym(f"{DIM_CALL}({v.var}, {i})") if d is None else d for i, d in enumerate(v.shape)]

    def known(self, v: Value) -> list:
        """Sizes known at conversion time (ints), None where only the run time knows."""
        return [d if isinstance(d, int | np.integer) else None for d in self.dims(v)]

    def axis(self, v: Value, axis: int) -> int:
        """An axis attribute of `v` made non-negative."""
        return axis + self.rank(v) if axis < 0 else axis

    def same_size(self, a: Value, i: int, b: Value, j: int) -> bool:
        """Size i of `a` equals size j of `b` whatever the inputs: equal ints, or the same symbolic
        name from shape inference. False means "not known here", not "different"."""
        da, db = self.dims(a)[i], self.dims(b)[j]
        if not isinstance(da, Sym) and not isinstance(db, Sym):
            return int(da) == int(db)
        if isinstance(da, Sym) and isinstance(db, Sym) and da.code == db.code:
            return True
        na = a.dim_names[i] if a.dim_names and len(a.dim_names) > i else None
        nb = b.dim_names[j] if b.dim_names and len(b.dim_names) > j else None
        return na is not None and na == nb

    def broadcast_dims(self, values: list[Value]) -> list | None:
        """The numpy-style broadcast of `values`: per axis, 1, a fixed size, or (value, axis) of an
        operand whose run-time size it is; None where two run-time sizes cannot be told equal at
        conversion time (one of them might be a broadcast 1)."""
        rank = max(self.rank(v) for v in values)
        out = []
        for axis in range(rank):
            cands = []  # (size, value, its axis) of every operand not 1 on this (right-aligned) axis
            for v in values:
                i = axis - (rank - self.rank(v))
                if i >= 0:
                    d = self.dims(v)[i]
                    if isinstance(d, Sym) or int(d) != 1:
                        cands.append((d, v, i))
            fixed = [int(d) for d, _, _ in cands if not isinstance(d, Sym)]
            if not cands or fixed:
                out.append(fixed[0] if fixed else 1)  # a valid model's other sizes match it (or are 1)
            elif all(self.same_size(cands[0][1], cands[0][2], v, i) for _, v, i in cands[1:]):
                out.append(cands[0][1:])
            else:
                return None
        return out

    def broadcast_shape_code(self, dims: list) -> str:
        """Code for a shape from broadcast_dims."""
        return self.shape_code([d if isinstance(d, int) else self.dims(d[0])[d[1]] for d in dims])

    def has_dims(self, v: Value, dims: list) -> bool:
        """`v` has exactly the sizes `dims` (from broadcast_dims): broadcasting it changes nothing."""
        if self.rank(v) != len(dims):
            return False
        own = self.dims(v)
        return all(
            (not isinstance(own[i], Sym) and int(own[i]) == d)
            if isinstance(d, int)
            else self.same_size(v, i, *d)
            for i, d in enumerate(dims)
        )

    def slice_subscript(self) -> str:
        """Slice (opset >= 10) as a Python subscript: Python slicing clamps out-of-range bounds as
        ONNX does; bounds past +-INT64_MAX/2 mean "from / to the end" and are left empty (written
        as numbers they overflow int32 index kernels)."""
        node = self.node
        rank = self.rank(node.inputs[0])
        starts = self.ints(node.inputs[1], "Slice starts")
        ends = self.ints(node.inputs[2], "Slice ends")
        axes = self.ints(node.inputs[3], "Slice axes") if self.has(3) else list(range(len(starts)))
        steps = self.ints(node.inputs[4], "Slice steps") if self.has(4) else [1] * len(starts)
        big = np.iinfo(np.int64).max // 2
        idx = [":"] * rank
        for s, en, a, st in zip(starts, ends, axes, steps, strict=True):
            if isinstance(st, Sym):
                raise self.error("Slice steps must be known at conversion time")
            a = a + rank if a < 0 else a
            s_code = (
                "" if (not isinstance(s, Sym) and ((st > 0 and s == 0) or abs(s) >= big)) else self.sym(s)
            )
            en_code = "" if (not isinstance(en, Sym) and abs(en) >= big) else self.sym(en)
            idx[a] = f"{s_code}:{en_code}" + (f":{st}" if st != 1 else "")
        return ", ".join(idx)

    def reduce(self, write) -> None:
        """Reduce*: axes from an input (opset 18, ReduceSum 13) or an attribute before; no axes
        reduces every axis, or returns the input with noop_with_empty_axes. `write(x, axes, keepdims)`
        is the target's expression, axes a tuple of ints or None for every axis."""
        node = self.node
        axes = self.ints(node.inputs[1], "reduction axes") if self.has(1) else node.attrs.get("axes")
        x = self.t(node.inputs[0])
        if not axes and node.attrs.get("noop_with_empty_axes", 0):
            self.out(x)
            return
        self.out(write(x, tuple(int(a) for a in axes) if axes else None, bool(node.attrs.get("keepdims", 1))))

    def arg_extreme(self, write, flip) -> None:
        """ArgMax / ArgMin as int64: `write(x, axis, keepdims)` gives the first index of the extreme
        value; with select_last_index it runs on `flip(x, axis)` and the index is mirrored back."""
        node = self.node
        v = node.inputs[0]
        axis, keep = self.axis(v, node.attrs.get("axis", 0)), bool(node.attrs.get("keepdims", 1))
        x = self.t(v)
        if node.attrs.get("select_last_index", 0):
            self.line(f"_r = {flip(x, axis)}")
            self.out(f"({self.sym(self.dims(v)[axis] - 1)} - {write('_r', axis, keep)})")
        else:
            self.out(write(x, axis, keep))

    def gemm(self, matmul) -> tuple[str, str | None]:
        """Gemm as (alpha * op(A) @ op(B), beta * C or None): `matmul(a, b, trans_a, trans_b)` is the
        target's product; the caller adds the two (targets broadcast C differently)."""
        node = self.node
        ta, tb = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        expr = matmul(self.t(node.inputs[0]), self.t(node.inputs[1]), ta, tb)
        if alpha != 1.0:
            expr = f"({expr} * {alpha!r})"
        if not self.has(2):
            return expr, None
        c = self.t(node.inputs[2])
        return expr, (c if beta == 1.0 else f"({beta!r} * {c})")

    def nary(self, fn, args: list[str] | None = None, mean: bool = False) -> str:
        """Max / Min / Sum of any number of inputs folded left through the binary `fn(a, b)`; with
        `mean` (and `fn` adding) the sum divided by the count (ONNX Mean: float inputs only)."""
        args = args if args is not None else [self.t(v) for v in self.node.inputs]
        expr = args[0]
        for a in args[1:]:
            expr = fn(expr, a)
        return f"({expr} / {len(args)})" if mean and len(args) > 1 else expr

    def reshape_target(self) -> list:
        """Reshape's target with each 0 replaced by the input's size there (unless allowzero)."""
        node = self.node
        target = self.ints(node.inputs[1], "Reshape's target shape")
        if node.attrs.get("allowzero", 0) or not any(_is(t, 0) for t in target):
            return target
        dims = self.dims(node.inputs[0])
        return [dims[i] if _is(t, 0) else t for i, t in enumerate(target)]

    def expand_shape(self) -> list | None:
        """Expand's target with ONNX's two-way broadcast resolved: per output axis an int or a run-time
        size, or None for "the input's own size on this axis". None (the whole list) when it depends
        on two sizes only the run time knows (either may be 1)."""
        x = self.node.inputs[0]
        target = self.ints(self.node.inputs[1], "Expand's target shape")
        dims = self.dims(x)
        rank = max(len(dims), len(target))
        new = rank - len(dims)  # leading axes the input does not have: the target's sizes as they are
        dims = [1] * new + dims
        target = [1] * (rank - len(target)) + target
        out = []
        for i, (d, t) in enumerate(zip(dims, target, strict=True)):
            if i < new:
                out.append(t)
            elif _is(t, 1) or _same(d, t):
                out.append(None)
            elif not isinstance(t, Sym) or _is(d, 1):
                out.append(t)  # a fixed target size not 1: the input's is 1 or the same
            elif not isinstance(d, Sym):
                out.append(None)  # a fixed input size not 1: the target's is 1 or the same
            else:
                return None
        return out

    def split_sizes(self) -> tuple[int, list]:
        """Split (opset >= 18): (axis, sizes); without sizes, num_outputs parts of ceil(n/k), the last
        one smaller."""
        node = self.node
        x = node.inputs[0]
        axis = node.attrs.get("axis", 0)
        axis = axis + self.rank(x) if axis < 0 else axis
        n = len(node.outputs)
        if self.has(1):
            return axis, self.ints(node.inputs[1], "Split sizes")
        total = self.dims(x)[axis]
        chunk = -(-total // n)
        return axis, [chunk] * (n - 1) + [total - (n - 1) * chunk]

    def split_subscripts(self) -> list[str]:
        """One Python subscript per Split output."""
        axis, sizes = self.split_sizes()
        rank = self.rank(self.node.inputs[0])
        out, start = [], 0
        for size in sizes:
            idx = [":"] * rank
            idx[axis] = f"{self.sym(start)}:{self.sym(start + size)}"
            out.append(", ".join(idx))
            start = start + size
        return out

    # ---- writing outputs --------------------------------------------------------------------------
    def out(self, expr: str, i: int = 0) -> None:
        self.lines.append(f"{self.node.outputs[i].var} = {expr}")

    def outs(self, expr: str) -> None:
        targets = ", ".join(o.var for o in self.node.outputs)
        self.lines.append(f"{targets}, = {expr}" if len(self.node.outputs) == 1 else f"{targets} = {expr}")

    def line(self, code: str) -> None:
        self.lines.append(code)

    def error(self, msg: str) -> ConversionError:
        n = self.node
        return ConversionError(f"{self.target.name}: {n.op} node {n.name!r} (opset {self.prog.opset}): {msg}")


def generate(target: Target, prog: Program, trace: bool = False) -> str:
    """Source code of the module for `prog` in `target`'s framework. With `trace`, the module also
    returns every runtime node's outputs after the real outputs (for `--validate`)."""
    target = type(target)()  # a fresh one per conversion: targets may keep per-module state
    em = Emitter(target, prog)
    for node in prog.nodes:
        handler = target.registry.lookup(node.op, prog.opset, node.name)
        em.node = node
        em.lines.append(f"# {node.op} {node.name}")
        handler(em, node)
    for v in prog.outputs:  # outputs that folded to constants
        if v.is_static:
            em.lines.append(f"{v.var} = {em.t(Value(v.name, static=v.static))}")
    for name in [w for w in prog.weights if w not in em.used_weights]:
        del prog.weights[name]  # replaced (e.g. by a transposed copy), or never read
    dim_lines = [f"{d} = {target.dim(var, axis)}" for d, (var, axis) in prog.dims.items()]
    if trace:
        extra = [o for n in prog.nodes for o in n.outputs if o.var not in {v.var for v in prog.outputs}]
        prog = Program(
            prog.name, prog.opset, prog.inputs, prog.outputs + extra, prog.weights, prog.nodes, prog.dims
        )
    return target.module(prog, em.lines, dim_lines)
