"""The export directory's contract, torch-free: the part names, each part's inputs and outputs, and
manifest.json read into typed objects (`Manifest.read` / `Manifest.write`), every file name it lists
checked to stay inside its directory. Every runtime (ONNX Runtime, JAX, Paddle, MindSpore) uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimm.config import SliMMConfig
from slimm.errors import CheckpointError
from slimm.outdir import plain_name

FLOAT_PRECISIONS = ("fp32", "fp16")  # what the exporter writes itself; quantize.PRECISIONS the rest

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PARTS = ("A", "B", "C", "D", "E", "F")
PART_ROLES = {
    "A": "token embedding",
    "B": "vision encoder",
    "C": "multimodal fusion",
    "D": "M-RoPE cos/sin for prompts with images",
    "E": "rotary cos/sin for text-only prompts and decode steps",
    "F": "LLM decoder with KV cache, DeepStack and lm_head",
}


def part_file(part: str, variant: str | None = None) -> str:
    return f"SliMM_{part}.onnx" if variant is None else f"SliMM_{part}.{variant}.onnx"


# ---- I/O contract -----------------------------------------------------------------------------------
@dataclass
class Tensor:
    name: str
    dtype: str  # float32 | float16 | int64 | int8 (a fused F's int8 KV cache)
    dims: list  # ints or symbolic names
    role: str

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": self.dims, "role": self.role}

    @classmethod
    def from_dict(cls, d: dict) -> Tensor:
        return cls(d["name"], d["dtype"], list(d["dims"]), d.get("role", ""))


def io_spec(
    cfg: SliMMConfig, part: str, float_type: str, kv_type: str | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of one part: names, dtypes, symbolic dims, roles (written to the manifest).
    `kv_type`: F's cache entries (past and present keys / values) if not `float_type` (int8)."""
    t, v = cfg.text, cfg.vision
    d, hd, kv = t.hidden_size, t.head_dim, t.num_key_value_heads
    f = float_type
    c = kv_type or f
    if part == "A":
        return [Tensor("input_ids", "int64", ["batch", "seq"], "token ids")], [
            Tensor("inputs_embeds", f, ["batch", "seq", d], "token embeddings")
        ]
    if part == "B":
        # sizes are multiples of the merged-token count, so compilers that check shapes
        # symbolically (jax.export) can prove every reshape: rows = 4 L, tower patches = 4 L or 16 L
        scale = 2 if cfg.deepstack_type == "efficient" else 1
        patches = "16*tokens" if scale == 2 else "4*tokens"
        row = v.in_channels * v.temporal_patch_size * (scale * v.patch_size) ** 2
        ins = [
            Tensor("pixel_values", "float32", ["4*tokens", row], "patch rows from the image processor"),
            Tensor("rotary_ids", "int64", [patches, 2], "(row, col) of each tower patch, merge-window order"),
            Tensor("frame_ids", "int64", [patches], "frame of each tower patch: attention stays within one"),
        ]
        if cfg.deepstack_type == "efficient":
            ins += [
                Tensor("pixel_index", "int64", ["4*tokens"], "processor rows back to raster order"),
                Tensor(
                    "coarse_index", "int64", ["4*tokens"], "merge windows grouped 2x2 for the coarse tokens"
                ),
            ]
        outs = [Tensor("visual_embeds", f, ["tokens", d], "visual tokens for the LLM sequence")]
        if cfg.use_deepstack:
            outs.append(Tensor("deepstack", f, [cfg.num_deepstack, "tokens", d], "DeepStack slices"))
        return ins, outs
    if part == "C":
        return [
            Tensor("inputs_embeds", f, ["batch", "seq", d], "token embeddings (from A)"),
            Tensor("visual_embeds", f, ["visual_tokens", d], "visual tokens (from B)"),
            Tensor("visual_pos", "int64", ["visual_tokens"], "flat index b*seq+s of each visual token"),
        ], [Tensor("fused_embeds", f, ["batch", "seq", d], "embeddings with visual tokens written in")]
    if part in ("D", "E"):
        pos_dims = [3, "batch", "seq"] if part == "D" else ["batch", "seq"]
        return [
            Tensor("position_ids", "int64", pos_dims, "M-RoPE (t, h, w) rows" if part == "D" else "positions")
        ], [
            Tensor("cos", f, ["batch", "seq", hd], "rotary cos"),
            Tensor("sin", f, ["batch", "seq", hd], "rotary sin"),
        ]
    if part == "F":
        ins = [
            Tensor("inputs_embeds", f, ["batch", "seq", d], "embeddings of the current tokens"),
            Tensor("cos", f, ["batch", "seq", hd], "rotary cos (D or E)"),
            Tensor("sin", f, ["batch", "seq", hd], "rotary sin (D or E)"),
            Tensor("past_mask", "int64", ["batch", "capacity"], "1 where a cache slot holds a real token"),
            Tensor("cur_mask", "int64", ["batch", "seq"], "1 for real current tokens, 0 for left padding"),
        ]
        n = t.num_hidden_layers
        ins += [
            Tensor(f"past_key.{i}", c, ["batch", kv, "capacity", hd], "key cache buffer") for i in range(n)
        ]
        ins += [
            Tensor(f"past_value.{i}", c, ["batch", kv, "capacity", hd], "value cache buffer")
            for i in range(n)
        ]
        if cfg.use_deepstack:
            ins += [
                Tensor(
                    "deepstack",
                    f,
                    [cfg.num_deepstack, "visual_tokens", d],
                    "DeepStack slices (empty in decode)",
                ),
                Tensor("visual_pos", "int64", ["visual_tokens"], "flat index b*seq+s of each visual token"),
            ]
        outs = [
            Tensor("logits", "float32", ["batch", t.vocab_size], "logits of the last position"),
            Tensor("next_token", "int64", ["batch"], "greedy argmax of logits"),
        ]
        outs += [
            Tensor(f"present_key.{i}", c, ["batch", kv, "seq", hd], "new keys, to write at the cache offset")
            for i in range(n)
        ]
        outs += [Tensor(f"present_value.{i}", c, ["batch", kv, "seq", hd], "new values") for i in range(n)]
        return ins, outs
    raise ValueError(f"unknown part {part!r}; parts are {PARTS}")


# ---- manifest.json ----------------------------------------------------------------------------------
def _optional_name(name: Any, where: Path, entry: str) -> str | None:
    return None if name is None else plain_name(name, where, f"entry {entry}")


def _op_names(ops: Any, where: Path, at: str) -> list[str]:
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
        raise CheckpointError(f"{where}: entry {at}.contrib_ops is not a list of operator names")
    return ops


@dataclass
class Variant:
    """Another file of a part for one phase (a mixed-precision export's `prefill` F): the same
    inputs, outputs and export stamp as the part's own file, its weights quantized another way."""

    file: str
    data: str | None = None
    contrib_ops: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, where: Path, at: str) -> Variant:
        if not isinstance(d, dict) or "file" not in d:
            raise CheckpointError(f"{where}: entry {at} is not an object naming a file")
        return cls(
            file=plain_name(d["file"], where, f"entry {at}.file"),
            data=_optional_name(d.get("data"), where, f"{at}.data"),
            contrib_ops=_op_names(d.get("contrib_ops", []), where, at),
        )

    def to_dict(self) -> dict[str, Any]:
        extra = {"contrib_ops": list(self.contrib_ops)} if self.contrib_ops else {}
        return {"file": self.file, "data": self.data, **extra}


@dataclass
class Part:
    """One part's entry. Export directories name an ONNX file (`file`, `data`); converted directories
    name the framework artifact (`name`, its generated `source`, its `files`, the `input_order`)."""

    role: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    file: str | None = None  # SliMM_X.onnx
    data: str | None = None  # its external weights, None when it has none
    name: str | None = None  # converted: the artifact's base name (SliMM_X)
    source: str | None = None  # converted: the generated module
    files: list[str] = field(default_factory=list)  # converted: the artifact's files
    input_order: list[str] | None = None  # converted: positional order of the artifact's inputs
    # exports: ONNX Runtime's own operators (com.microsoft) the part uses; no converter target has them
    contrib_ops: list[str] = field(default_factory=list)
    # part F of a mixed-precision export: the file that runs prompts (more than one new token a row)
    prefill: Variant | None = None

    def input(self, name: str) -> Tensor:
        return next(t for t in self.inputs if t.name == name)

    @classmethod
    def from_dict(cls, d: Any, where: Path, part: str) -> Part:
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: entry parts.{part} is not an object")
        at = f"parts.{part}"
        ops = _op_names(d.get("contrib_ops", []), where, at)
        prefill = d.get("prefill")
        if prefill is not None and part != "F":
            raise CheckpointError(f"{where}: entry {at}.prefill: only part F has a prefill variant")
        try:
            return cls(
                role=d.get("role", ""),
                inputs=[Tensor.from_dict(t) for t in d["inputs"]],
                outputs=[Tensor.from_dict(t) for t in d["outputs"]],
                file=_optional_name(d.get("file"), where, f"{at}.file"),
                data=_optional_name(d.get("data"), where, f"{at}.data"),
                name=_optional_name(d.get("name"), where, f"{at}.name"),
                source=_optional_name(d.get("source"), where, f"{at}.source"),
                files=[plain_name(f, where, f"entry {at}.files") for f in d.get("files", [])],
                input_order=d.get("input_order"),
                contrib_ops=ops,
                prefill=None if prefill is None else Variant.from_dict(prefill, where, f"{at}.prefill"),
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: entry {at} is unreadable ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict[str, Any]:
        io = {"inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}
        if self.file is not None:
            extra = {"contrib_ops": list(self.contrib_ops)} if self.contrib_ops else {}
            if self.prefill is not None:
                extra["prefill"] = self.prefill.to_dict()
            return {"file": self.file, "data": self.data, "role": self.role, **io, **extra}
        return {
            "name": self.name,
            "source": self.source,
            "files": self.files,
            "role": self.role,
            **io,
            "input_order": self.input_order,
        }


@dataclass
class Quantization:
    """How a quantized export was made from its fp32 source (slimm.export.quantize)."""

    method: str
    bits: int
    block_size: int
    accuracy_level: int
    rewritten: dict[str, dict[str, int]]  # part -> operator kind -> nodes rewritten
    source: str
    weight_range_bits: int | None = None  # w8a8 only
    # part (or "F.prefill") -> the precision its weights got: int8 | int4 | w8a8; parts not listed
    # were copied. None in manifests written before it was recorded
    precisions: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "bits": self.bits,
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
        }
        if self.weight_range_bits is not None:
            d["weight_range_bits"] = self.weight_range_bits
        if self.precisions is not None:
            d["precisions"] = dict(self.precisions)
        return {**d, "rewritten": self.rewritten, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Quantization:
        precisions = d.get("precisions")
        if precisions is not None and not (
            isinstance(precisions, dict) and all(isinstance(v, str) for v in precisions.values())
        ):
            raise TypeError(f"precisions {precisions!r} is not an object of part -> precision")
        return cls(
            d["method"],
            d["bits"],
            d["block_size"],
            d["accuracy_level"],
            d.get("rewritten", {}),
            d.get("source", ""),
            d.get("weight_range_bits"),
            d.get("precisions"),
        )


@dataclass
class Manifest:
    """manifest.json of an export (format slimm-onnx) or converted (slimm-<target>) directory."""

    export_id: str  # also stamped into every part file: parts of two exports cannot be mixed
    max_seq_len: int  # KV cache capacity the parts were exported for
    config: SliMMConfig  # the "model" entry
    parts: dict[str, Part]
    format: str = "slimm-onnx"
    precision: str | None = "fp32"  # fp32 | fp16 | int8 | int4 | w8a8 | int4+w8a8 | int8+w8a8
    opset: int | None = None
    files: list[str] = field(default_factory=list)  # runtime files beside the parts (tokenizer, ...)
    tokenizer: bool = False
    source: str | None = None  # the directory it was made from
    weights_dtype: str | None = None  # exports only
    quantization: Quantization | None = None  # quantized exports only
    target: str | None = None  # converted only: jax | paddle | mindspore
    framework_version: str | None = None  # converted only
    validated: dict[str, str] | None = None  # converted only: --validate's report per part
    version: int = MANIFEST_VERSION

    @property
    def converted(self) -> bool:
        return self.format != "slimm-onnx"

    @classmethod
    def read(cls, directory: str | Path, fmt: str = "slimm-onnx") -> Manifest:
        """Read and check `directory`/manifest.json: format, version, the six parts, file names."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: directory not found")
        if not path.exists():
            raise CheckpointError(f"{path}: not found; is {directory} an export directory (`slimm export`)?")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, path, fmt)

    @classmethod
    def from_dict(cls, d: Any, path: Path, fmt: str = "slimm-onnx") -> Manifest:
        if not isinstance(d, dict) or d.get("format") != fmt:
            got = d.get("format") if isinstance(d, dict) else None
            raise CheckpointError(f"{path}: format is {got!r}, expected {fmt!r}")
        if d.get("version") != MANIFEST_VERSION:
            raise CheckpointError(
                f"{path}: manifest version {d.get('version')!r}; this slimm reads version {MANIFEST_VERSION}"
            )
        for key in ("model", "parts", "export_id", "max_seq_len"):
            if key not in d:
                raise CheckpointError(f"{path}: no {key!r} entry")
        if not isinstance(d["parts"], dict):
            raise CheckpointError(f"{path}: entry parts is not an object")
        missing = [p for p in PARTS if p not in d["parts"]]
        if missing:
            raise CheckpointError(f"{path}: parts {', '.join(missing)} are not listed")
        try:
            config = SliMMConfig.from_dict(d["model"])
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: model settings unreadable ({e})") from None
        files = d.get("files", [])
        if not isinstance(files, list):
            raise CheckpointError(f"{path}: entry files is not a list")
        try:
            quant = Quantization.from_dict(d["quantization"]) if d.get("quantization") else None
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: entry quantization is unreadable ({e})") from None
        max_seq_len = d["max_seq_len"]
        if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
            raise CheckpointError(f"{path}: max_seq_len {max_seq_len!r} is not a positive integer")
        return cls(
            export_id=str(d["export_id"]),
            max_seq_len=max_seq_len,
            config=config,
            parts={p: Part.from_dict(e, path, p) for p, e in d["parts"].items()},
            format=d["format"],
            precision=d.get("precision"),
            opset=d.get("opset"),
            files=[plain_name(f, path, "entry files") for f in files],
            tokenizer=bool(d.get("tokenizer")),
            source=d.get("source"),
            weights_dtype=d.get("weights_dtype"),
            quantization=quant,
            target=d.get("target"),
            framework_version=d.get("framework_version"),
            validated=d.get("validated"),
            version=d["version"],
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order `slimm export` / `slimm convert` have always written."""
        d: dict[str, Any] = {"format": self.format, "version": self.version}
        if self.converted:
            d.update(target=self.target, framework_version=self.framework_version)
        d.update(export_id=self.export_id, precision=self.precision)
        if not self.converted:
            d["weights_dtype"] = self.weights_dtype
        d.update(opset=self.opset, max_seq_len=self.max_seq_len, model=self.config.to_dict())
        d["parts"] = {p: part.to_dict() for p, part in self.parts.items()}
        d.update(tokenizer=self.tokenizer, files=list(self.files))
        if self.converted:
            d["validated"] = self.validated
        d["source"] = self.source
        if self.quantization is not None:
            d["quantization"] = self.quantization.to_dict()
        return d

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def read_manifest(export_dir: str | Path, fmt: str = "slimm-onnx") -> dict[str, Any]:
    """The checked manifest as a plain dict plus its parsed "config", for the converter until it reads
    `Manifest` (same checks as `Manifest.read`, file names included)."""
    m = Manifest.read(export_dir, fmt)
    d = json.loads((Path(export_dir) / MANIFEST).read_text())
    d["config"] = m.config
    return d
