"""int8 / int4 / w8a8 / mixed quantization of an export directory, with ONNX Runtime's own operators.

int8 and int4 are weight-only: MatMuls with constant weights become `MatMulNBits` (ONNX Runtime's
`MatMulNBitsQuantizer`), activations stay float32 between operators; for decoding, which reads
every weight once a step. w8a8 quantizes weights (int8 in a 7-bit range, per output channel) and
activations (uint8, one scale per tensor, computed at run time): MatMul -> `MatMulInteger` (ONNX Runtime's
`quantize_dynamic`, fused into `DynamicQuantizeMatMul` when a session loads it), int8 x int8 GEMMs
for the compute-bound phases (vision encode, prefill), the vision tower included. In all three the
token embedding's Gather becomes `GatherBlockQuantized`. The mixed precisions int4+w8a8 / int8+w8a8
take each phase's faster one: int4 / int8 for A and F (decode), w8a8 for B and for a second F file,
F's `prefill` variant, that the ONNX backend runs for prompts. The result is another export directory
(same manifest, parts and export id) that `slimm.load(..., "onnx")` runs.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from slimm.errors import InputError
from slimm.export.fused import contrib_ops
from slimm.export.manifest import PARTS, Manifest, Quantization, Variant, part_file
from slimm.outdir import check_out_dir, staged

WEIGHT_ONLY = {"int8": 8, "int4": 4}  # MatMulNBits precisions -> bits per weight
# mixed precisions -> the weight-only precision of decode (A, F); B and F's prefill variant get w8a8.
# M=1 matmuls (decode) are fastest as int4 (0.32 ms, w8a8 0.66 ms on one 896x4864 weight), M=256
# ones (prefill, the vision tower) as w8a8 (5.8 ms, int4 32 ms, fp32 30 ms): ONNX Runtime 1.32,
# 2 threads, a Sapphire Rapids CPU (AMX)
MIXED = {"int4+w8a8": "int4", "int8+w8a8": "int8"}
PRECISIONS = (*WEIGHT_ONLY, "w8a8", *MIXED)
BLOCKED = (*WEIGHT_ONLY, *MIXED)  # the precisions with MatMulNBits blocks: --block-size applies
PREFILL = "prefill"  # the name of F's variant for prompts in a mixed export (SliMM_F.prefill.onnx)
BLOCK_SIZE = 32  # weights per scale / zero point along the reduction axis
# MatMulNBits' accuracy_level 4: activations quantized to int8 per block and int8 dot products
# (MLAS's fastest CPU path here: see benchmarks/README.md); 0 keeps float32 activations
ACCURACY_LEVEL = 4
# token embedding; decoder projections and lm_head; w8a8: the vision tower and merger too
DEFAULT_PARTS = {
    "int8": ("A", "F"),
    "int4": ("A", "F"),
    "w8a8": ("A", "B", "F"),
    **{p: ("A", "B", "F") for p in MIXED},
}
METHODS = {
    "int8": "weight-only, asymmetric blocks, ONNX Runtime MatMulNBits / GatherBlockQuantized",
    "int4": "weight-only, asymmetric blocks, ONNX Runtime MatMulNBits / GatherBlockQuantized",
    "w8a8": "int8 weights per output channel (symmetric, 7-bit range), uint8 activations per tensor "
    "quantized at run time: ONNX Runtime MatMulInteger (DynamicQuantizeMatMul); embedding "
    "GatherBlockQuantized 8-bit",
    **{
        p: f"{d} for decode (A, F: MatMulNBits / GatherBlockQuantized), w8a8 for the vision tower (B) "
        "and prompts (F's prefill variant: MatMulInteger)"
        for p, d in MIXED.items()
    },
}
# w8a8 weights use 7 of their 8 bits (quantize_dynamic's reduce_range). Without VNNI, MLAS's u8 x s8
# kernels (AVX2, AVX-512 without VNNI) add pairs of products in int16 with saturation: 255 x 127 x 2
# overflows, and full-range weights gave logits errors of 0.21-0.28 (cosine 0.989) on an AVX2 EPYC
# against 0.026 on a VNNI Xeon. With 7-bit weights no pair can overflow, so the int32 results are
# exact on every x86-64 CPU and the export gives the same logits everywhere (measured: 0.046-0.057,
# cosine 0.9986-0.9990, on AVX2 and AVX-512 VNNI alike). uint8 weights (MLAS's u8 x u8 kernel, no
# saturation) were as CPU-independent and more accurate (0.030-0.034) but ran the int8 GEMM 2.3x
# slower on the VNNI machine: w8a8 exists for speed, so 7-bit int8 it is.
W8A8_REDUCE_RANGE = True


def check_precision(precision: str, choices: tuple[str, ...] = PRECISIONS) -> None:
    """One error for every unknown precision, a misspelt mixed one included."""
    if precision in choices:
        return
    hint = ""
    if "+" in str(precision):
        mixed = " or ".join(p for p in MIXED if p in choices)
        hint = f" (a mixed precision is decode's weight-only precision + w8a8: {mixed})"
    raise InputError(f"precision {precision!r} is not one of {', '.join(choices)}{hint}")


def part_precision(precision: str, part: str) -> str:
    """The precision of part `part`'s own file in a `precision` export (a mixed one: decode's for
    A and F, w8a8 for the vision tower)."""
    if precision in MIXED:
        return "w8a8" if part == "B" else MIXED[precision]
    return precision


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"block size {block_size} must be a power of two >= 16")


def _quantize_blocks_u8(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 quantization of a 2-D array in blocks of `block` along its last axis:
    w ~ (q - zero_point) * scale. Returns q (rows, cols), scales and zero points (rows, cols/block)."""
    rows, cols = w.shape
    if cols % block:
        raise InputError(f"cannot quantize a ({rows}, {cols}) table in blocks of {block}")
    wb = w.reshape(rows, cols // block, block)
    lo = np.minimum(wb.min(-1), 0.0)  # zero stays exactly representable
    hi = np.maximum(wb.max(-1), 0.0)
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    q = np.clip(np.round(wb / scale[..., None]) + zero[..., None], 0, 255)
    return q.astype(np.uint8).reshape(rows, cols), scale.astype(np.float32), zero.astype(np.uint8)


def _table_gathers(model) -> list[str]:
    """Names of the Gathers that look rows up in a constant 2-D float table (token embeddings)."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            table is not None
            and len(table.dims) == 2
            and axis == 0
            and table.data_type == onnx.TensorProto.FLOAT
        ):
            names.append(node.name)
    return names


def _gather_int8(model, names: list[str], block: int) -> None:
    """The named Gathers -> GatherBlockQuantized with bits=8. ONNX Runtime's quantizer only
    writes 4-bit gathers; the operator itself also takes uint8 blocks."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for pos, node in enumerate(list(graph.node)):
        if node.name not in names:
            continue
        table = inits[node.input[0]]
        q, scale, zero = _quantize_blocks_u8(numpy_helper.to_array(table), block)
        names = [table.name + "_Q8", table.name + "_scales", table.name + "_zero_points"]
        graph.initializer.remove(table)
        del inits[table.name]
        graph.initializer.extend(
            numpy_helper.from_array(a, n) for a, n in zip((q, scale, zero), names, strict=True)
        )
        new = helper.make_node(
            "GatherBlockQuantized",
            [names[0], node.input[1], names[1], names[2]],
            list(node.output),
            name=node.name + "_Q8",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block,
            bits=8,
        )
        graph.node.remove(node)
        graph.node.insert(pos, new)


def _allow_packed_ints(model) -> None:
    """uint4 / uint8 block tensors with contrib ops: opset 21 and IR version 10 at least."""
    _use_opset(model, "com.microsoft", 1)
    _use_opset(model, "", max(21, _opset(model, "")))
    model.ir_version = max(model.ir_version, 10)


def _opset(model, domain: str) -> int:
    return next((o.version for o in model.opset_import if o.domain == domain), 0)


def _use_opset(model, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = version
            return
    model.opset_import.add(domain=domain, version=version)


def quantize_part(
    path: Path, out: Path, bits: int, block_size: int = BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL
) -> dict[str, int]:
    """One part file -> its quantized copy at `out` (weights in `out.name + '.data'`); returns how
    many nodes of each kind were rewritten."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # the quantizer logs every node at INFO and warns about the opset bump it needs for int4
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    model = onnx.load(str(path))
    before = {n.name for n in model.graph.node}
    tables = _table_gathers(model)
    if tables:
        _allow_packed_ints(model)
    if bits == 8:
        _gather_int8(model, tables, block_size)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=accuracy_level or None,
        op_types_to_quantize=("MatMul",),
        nodes_to_include=tables if bits == 4 else None,  # 4-bit gathers: the quantizer's own
        quant_axes=(("MatMul", 0), ("Gather", 1)),  # blocks along the reduction axis / the row
    )
    # its 4-bit Gather path computes data / scale before choosing 0 where scale == 0 (an all-zero
    # block, such as an unused token's embedding row): the NumPy warning is noise, the values right
    with np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    model = quantizer.model.model
    counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0}
    for n in model.graph.node:
        if n.op_type in counts and n.name not in before:
            counts[n.op_type] += 1
    data = _data_file(out)
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    _finish_files(out)
    return counts


def _data_file(part_file: Path) -> Path:
    return part_file.parent / (part_file.name + ".data")


def _finish_files(part_file: Path) -> None:
    """An empty weights file removed (file modes: slimm.outdir.staged)."""
    data = _data_file(part_file)
    if data.exists() and data.stat().st_size == 0:
        data.unlink()


def quantize_dynamic_part(path: Path, out: Path) -> dict[str, int]:
    """w8a8: one part file -> its copy at `out` with every constant-weight MatMul as MatMulInteger
    (int8 weights per output channel; activations quantized per tensor by DynamicQuantizeLinear)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _data_file(out).unlink(missing_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer advises shape pre-processing on the root logger
    try:
        quantize_dynamic(
            str(path),
            str(out),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=W8A8_REDUCE_RANGE,
            use_external_data_format=True,
            # ONNX's shape inference cannot type the outputs of ONNX Runtime's own operators (the
            # fused part F): their float activations are float32
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    _finish_files(out)
    model = onnx.load(str(out), load_external_data=False)
    return {"MatMulInteger": sum(n.op_type == "MatMulInteger" for n in model.graph.node)}


def quantize_export(
    export_dir: str | Path,
    out_dir: str | Path,
    precision: str,
    parts: tuple[str, ...] | None = None,
    block_size: int = BLOCK_SIZE,
    accuracy_level: int = ACCURACY_LEVEL,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a quantized copy of a float32 export directory to `out_dir`.

    `parts` (default: DEFAULT_PARTS[precision]) are rewritten (their constant-weight MatMuls and
    Gathers), the others and every runtime file are copied; manifest.json keeps the export id and
    records the precision and the settings. `block_size` / `accuracy_level` are MatMulNBits' (and the
    embedding's blocks); w8a8's MatMuls have one scale per output channel. A mixed precision
    (int4+w8a8, int8+w8a8) also writes F's prefill variant, F quantized as w8a8. `out_dir` is written whole
    or not at all; a non-empty one that is not a slimm export is refused unless `overwrite`.
    """
    check_precision(precision)
    parts = DEFAULT_PARTS[precision] if parts is None else tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise InputError(f"unknown parts {unknown}; parts are {', '.join(PARTS)}")
    if precision in MIXED and "F" not in parts:
        raise InputError(
            f"precision {precision} quantizes part F twice (decode and prefill); parts {list(parts)} leave it out"
        )
    check_block_size(block_size)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = Manifest.read(export_dir)
    if manifest.precision != "fp32":
        raise InputError(
            f"{export_dir}: quantization starts from an fp32 export; this one is {manifest.precision!r}"
        )
    if out_dir.resolve() == export_dir.resolve():
        raise InputError("the quantized export needs its own directory (--out differs from the export)")
    check_out_dir(out_dir, source=export_dir, overwrite=overwrite)
    with staged(out_dir) as tmp:
        _quantize_into(export_dir, manifest, tmp, precision, parts, block_size, accuracy_level, progress)
    return out_dir


def _quantize_into(
    export_dir: Path,
    manifest: Manifest,
    out_dir: Path,
    precision: str,
    parts: tuple[str, ...],
    block_size: int,
    accuracy_level: int,
    progress: bool,
) -> None:
    from tqdm import tqdm

    rewritten, precisions = {}, {}
    bar = tqdm(PARTS, desc=f"quantize {precision}", unit="part", disable=not progress, file=sys.stderr)
    for part in bar:
        entry = manifest.parts[part]
        src, dst = export_dir / entry.file, out_dir / entry.file
        bar.set_postfix_str(f"{part}: {entry.role}")
        if part not in parts:
            for name in (entry.file, entry.data):
                if name:
                    shutil.copyfile(export_dir / name, out_dir / name)
            continue
        variants = [(part, dst, part_precision(precision, part))]
        if part == "F" and precision in MIXED:  # F once more, as w8a8: the file prompts run
            variants.append((f"F.{PREFILL}", out_dir / part_file("F", PREFILL), "w8a8"))
        for key, path, method in variants:
            rewritten[key] = _quantize_file(src, path, part, method, block_size, accuracy_level)
            precisions[key] = method
            if path == dst:
                entry.data, entry.contrib_ops = _written(path)
            else:
                entry.prefill = Variant(path.name, *_written(path))
    for name in manifest.files:
        shutil.copyfile(export_dir / name, out_dir / name)
    manifest.precision = precision
    manifest.quantization = Quantization(
        method=METHODS[precision],
        bits=WEIGHT_ONLY.get(MIXED.get(precision, precision), 8),
        block_size=block_size,
        accuracy_level=accuracy_level,
        weight_range_bits=(7 if W8A8_REDUCE_RANGE else 8) if "w8a8" in precisions.values() else None,
        rewritten=rewritten,
        source=str(export_dir.resolve()),
        precisions=precisions,
    )
    manifest.write(out_dir)


def _quantize_file(
    src: Path, dst: Path, part: str, precision: str, block_size: int, accuracy_level: int
) -> dict[str, int]:
    """One part file quantized at int8 / int4 / w8a8 (w8a8's A: the 8-bit embedding gather, as int8's)."""
    if precision == "w8a8" and part != "A":
        return quantize_dynamic_part(src, dst)
    return quantize_part(src, dst, WEIGHT_ONLY.get(precision, 8), block_size, accuracy_level)


def _written(part_file: Path) -> tuple[str | None, list[str]]:
    """A quantized file's manifest fields: its data file (None when it has none), its contrib ops."""
    data = _data_file(part_file)
    return (data.name if data.exists() else None), contrib_ops(part_file)
