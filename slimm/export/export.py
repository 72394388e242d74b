"""PyTorch SliMM -> six ONNX parts plus a manifest; PARTS is the one list of part names.

A token embedding, B vision encoder, C multimodal fusion, D M-RoPE cos/sin for prompts with images,
E rotary cos/sin for text-only prompts and decode steps, F the decoder with KV cache, DeepStack and
lm_head. Host-side bookkeeping (vision index tensors, position ids) stays in NumPy, shared by every
backend; the parts hold only tensor math.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimm.config import DEFAULT_MAX_SEQ_LEN, SliMMConfig
from slimm.errors import InputError
from slimm.export.manifest import (
    FLOAT_PRECISIONS,
    PART_ROLES,
    PARTS,
    Manifest,
    Part,
    Tensor,
    io_spec,
    part_file,
)
from slimm.host.vision_index import vision_host_inputs
from slimm.hub import resolve_model
from slimm.model.slimm import SliMMForConditionalGeneration
from slimm.outdir import check_out_dir, staged

DEFAULT_OPSET = 20
ATTENTION_OPSET = 23  # a fused export's part B: ONNX's Attention operator (VisionTower.fuse_attention)
PRECISIONS = FLOAT_PRECISIONS
RUNTIME_FILES = (  # copied beside the parts: an export directory is self-contained
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
)


# ---- the six parts as modules ---------------------------------------------------------------------
class PartA(nn.Module):
    def __init__(self, m: SliMMForConditionalGeneration) -> None:
        super().__init__()
        self.embed_tokens = m.model.embed_tokens

    def forward(self, input_ids):  # (B, S) -> (B, S, d)
        return self.embed_tokens(input_ids)


class PartB(nn.Module):
    def __init__(self, m: SliMMForConditionalGeneration) -> None:
        super().__init__()
        self.visual = m.visual
        self.efficient = m.config.deepstack_type == "efficient"

    def forward(self, pixel_values, rotary_ids, frame_ids, pixel_index=None, coarse_index=None):
        tokens, slices = self.visual.run(pixel_values, rotary_ids, frame_ids, pixel_index, coarse_index)
        return tokens if slices is None else (tokens, slices)


class PartC(nn.Module):
    def forward(self, inputs_embeds, visual_embeds, visual_pos):
        B, S, d = inputs_embeds.shape
        flat = inputs_embeds.reshape(B * S, d).index_copy(
            0, visual_pos, visual_embeds.to(inputs_embeds.dtype)
        )
        return flat.view(B, S, d)


class PartD(nn.Module):
    def __init__(self, m: SliMMForConditionalGeneration) -> None:
        super().__init__()
        self.lm = m.model
        self.dtype = m.dtype

    def forward(self, position_ids):  # (3, B, S) -> cos, sin (B, S, head_dim)
        return self.lm.rope(position_ids, self.dtype)


class PartE(PartD):
    def forward(self, position_ids):  # (B, S): every M-RoPE row equal
        return self.lm.rope(position_ids[None].expand(3, -1, -1), self.dtype)


class PartF(nn.Module):
    def __init__(self, m: SliMMForConditionalGeneration) -> None:
        super().__init__()
        self.m = m

    def forward(
        self,
        inputs_embeds,
        cos,
        sin,
        past_mask,
        cur_mask,
        past_keys,
        past_values,
        deepstack=None,
        visual_pos=None,
    ):
        cfg = self.m.config
        hidden, new_k, new_v = self.m.model(
            inputs_embeds,
            cos,
            sin,
            past_keys,
            past_values,
            past_mask,
            cur_mask,
            deepstack,
            visual_pos,
            cfg.local_features_start,
            cfg.local_features_interval,
        )
        logits = self.m.logits(hidden[:, -1])  # (B, V) float32, last position
        return (logits, logits.argmax(-1), *new_k, *new_v)


def example_inputs(cfg: SliMMConfig, part: str, dtype: torch.dtype) -> tuple:
    """Small inputs to trace with; sizes chosen so no dynamic dim is 0, 1 or equal to another."""
    t = cfg.text
    B, S, T, L = 2, 7, 11, 6
    g = torch.Generator().manual_seed(0)
    if part == "A":
        return (torch.randint(0, t.vocab_size, (B, S), generator=g),)
    if part == "B":
        grid = np.array([[1, 4, 6]])  # 24 patch rows, 6 tokens
        dummy = vision_host_inputs(cfg.deepstack_type, cfg.spatial_merge_size, grid)
        rows = int(grid.prod())
        scale = 2 if cfg.deepstack_type == "efficient" else 1
        v = cfg.vision
        width = v.in_channels * v.temporal_patch_size * (scale * v.patch_size) ** 2
        args = [
            torch.randn(rows, width, generator=g),
            torch.from_numpy(dummy["rotary_ids"]),
            torch.from_numpy(dummy["frame_ids"]),
        ]
        if cfg.deepstack_type == "efficient":
            args += [torch.from_numpy(dummy["pixel_index"]), torch.from_numpy(dummy["coarse_index"])]
        return tuple(args)
    if part == "C":
        return (
            torch.randn(B, S, t.hidden_size, dtype=dtype, generator=g).to(dtype),
            torch.randn(3, t.hidden_size, generator=g).to(dtype),
            torch.tensor([1, 3, 9]),
        )
    if part == "D":
        return (torch.randint(0, 50, (3, B, S), generator=g),)
    if part == "E":
        return (torch.randint(0, 50, (B, S), generator=g),)
    if part == "F":
        hd, kv, d = t.head_dim, t.num_key_value_heads, t.hidden_size
        n = t.num_hidden_layers
        args = [
            torch.randn(B, S, d, generator=g).to(dtype),
            torch.randn(B, S, hd, generator=g).to(dtype),
            torch.randn(B, S, hd, generator=g).to(dtype),
            torch.ones(B, T, dtype=torch.int64),
            torch.ones(B, S, dtype=torch.int64),
            [torch.randn(B, kv, T, hd, generator=g).to(dtype) for _ in range(n)],
            [torch.randn(B, kv, T, hd, generator=g).to(dtype) for _ in range(n)],
        ]
        if cfg.use_deepstack:
            args += [torch.randn(cfg.num_deepstack, L, d, generator=g).to(dtype), torch.arange(L) * 2]
        return tuple(args)
    raise ValueError(part)


def dynamic_shapes(part: str, ins: list[Tensor], n_layers: int) -> tuple:
    """torch.export dynamic shapes, positional like the part's forward; one Dim object per name,
    and `k*name` dims as derived dims (so the ONNX graph records the relation too)."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(text: str):
        k, _, name = text.rpartition("*")
        base = dims.setdefault(name, torch.export.Dim(name))
        return int(k) * base if k else base

    def spec(tensor: Tensor) -> dict:
        return {i: dim(d) for i, d in enumerate(tensor.dims) if isinstance(d, str)}

    specs = [spec(t) for t in ins]
    if part == "F":
        head, caches, tail = specs[:5], specs[5 : 5 + 2 * n_layers], specs[5 + 2 * n_layers :]
        return (*head, caches[:n_layers], caches[n_layers:], *tail)
    return tuple(specs)


# ---- writing an export directory --------------------------------------------------------------------
def _quiet_export(module: nn.Module, args: tuple, path: Path, ins, outs, dyn, opset: int) -> None:
    import logging

    # the exporter is chatty (warnings about torchvision ops, dynamic-shape renames): keep the
    # user's terminal for our progress bar; real failures still raise
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            dynamic_shapes=dyn,
            input_names=[t.name for t in ins],
            output_names=[t.name for t in outs],
            opset_version=opset,
            external_data=True,
            verbose=False,
        )


def _to_fp16_weights(path: Path, min_elements: int = 1024) -> None:
    """Store float weights as float16 with a Cast back to float32 where they are used: half the
    size on disk, computation stays float32 (ONNX Runtime's CPU kernels are float32)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and np.prod(init.dims) >= min_elements:
            arr = numpy_helper.to_array(init).astype(np.float16)
            half = numpy_helper.from_array(arr, init.name + ".fp16")
            kept.append(half)
            casts.append(onnx.helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    _save(model, path)


def _save(model, path: Path) -> None:
    import onnx

    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=1024,
    )


def _stamp(path: Path, export_id: str, part: str) -> None:
    """Record which export and which part a file is, so mixed-up files are caught at load time."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for k, v in (("slimm.export_id", export_id), ("slimm.part", part)):
        model.metadata_props.add(key=k, value=v)
    onnx.save_model(model, str(path))  # external data references are kept as they are


def check_export_settings(
    precision: str = "fp32",
    block_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    parts: tuple[str, ...] = PARTS,
    fused: bool = False,
    kv_cache: str = "float",
) -> None:
    """export_model's settings, checked before any work (the CLI runs this before building a demo)."""
    from slimm.export.quantize import BLOCK_SIZE, BLOCKED, check_block_size, check_precision
    from slimm.export.quantize import PRECISIONS as QUANTIZED

    check_precision(precision, (*PRECISIONS, *QUANTIZED))
    if block_size is not None and precision not in BLOCKED:
        raise InputError(f"--block-size applies to int8 / int4 exports, not {precision}")
    check_block_size(block_size or BLOCK_SIZE)  # before the minutes of the float32 export
    if opset < 18:
        raise InputError(f"opset {opset}: the exporter needs opset 18 or newer")
    if max_seq_len < 1:
        raise InputError(f"max_seq_len must be at least 1, got {max_seq_len}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise InputError(f"unknown parts {unknown}; parts are {', '.join(PARTS)}")
    if fused:
        from slimm.export.fused import FUSED_PRECISIONS

        if precision not in FUSED_PRECISIONS:
            raise InputError(
                f"--fused is made for {', '.join(FUSED_PRECISIONS)}, not {precision}: fp16 only halves the files "
                "(its weights are cast to float32 at every step, which no fused operator saves); "
                "use --precision fp32 --fused, or int8"
            )
        if "F" not in parts:
            raise InputError("--fused replaces part F, which this export leaves out")
    from slimm.export.fused import KV_CACHES

    if kv_cache not in KV_CACHES:
        raise InputError(f"--kv-cache {kv_cache}: not one of {', '.join(KV_CACHES)}")
    if kv_cache != "float" and not fused:
        raise InputError(
            f"--kv-cache {kv_cache} is read by ONNX Runtime's GroupQueryAttention, which only the fused "
            "decoder uses: add --fused"
        )


def export_model(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    parts: tuple[str, ...] = PARTS,
    progress: bool = True,
    block_size: int | None = None,
    overwrite: bool = False,
    fused: bool = False,
    kv_cache: str = "float",
) -> Path:
    """Export a checkpoint directory to `out_dir`: SliMM_A..F.onnx (+ .onnx.data), manifest.json,
    and the tokenizer / chat template / preprocessor files.

    int8 / int4 / w8a8 / int4+w8a8 / int8+w8a8 export float32 parts into a temporary directory and
    quantize them (slimm.export.quantize; `block_size` is int8 / int4's, the mixed ones' too). `out_dir` is written whole or not at all
    (built beside it, renamed into place); a non-empty `out_dir` that is not a slimm export is
    refused unless `overwrite`.

    `fused`: part F written with ONNX Runtime's fused operators (slimm.export.fused), same inputs and
    outputs; such an export runs on ONNX Runtime only. `kv_cache="int8"` (fused only): its KV cache
    holds int8 entries with per-channel scales calibrated on the checkpoint (fused.calibrate_kv_scales).
    """
    from slimm.export.quantize import BLOCK_SIZE
    from slimm.export.quantize import PRECISIONS as QUANTIZED

    check_export_settings(precision, block_size, opset, max_seq_len, parts, fused, kv_cache)
    ckpt_dir = resolve_model(ckpt_dir)
    out_dir = check_out_dir(out_dir, source=ckpt_dir, overwrite=overwrite)
    if precision in QUANTIZED:
        from slimm.export.quantize import quantize_export

        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.fp32-", dir=out_dir.parent) as fp32:
            _export_parts(ckpt_dir, Path(fp32), "fp32", opset, max_seq_len, parts, progress, fused, kv_cache)
            return quantize_export(
                fp32,
                out_dir,
                precision,
                block_size=block_size or BLOCK_SIZE,
                progress=progress,
                overwrite=True,  # checked above, before the float32 export
            )
    with staged(out_dir) as tmp:
        _export_parts(ckpt_dir, tmp, precision, opset, max_seq_len, parts, progress, fused, kv_cache)
    return out_dir


def _export_parts(
    ckpt_dir: Path,
    out_dir: Path,
    precision: str,
    opset: int,
    max_seq_len: int,
    parts,
    progress: bool,
    fused: bool = False,
    kv_cache: str = "float",
) -> None:
    import uuid

    from tqdm import tqdm

    from slimm.export.fused import contrib_ops

    model = SliMMForConditionalGeneration.from_pretrained(ckpt_dir, torch_dtype="float32")
    model.model.fuse()  # part F: one matmul for q, k and v in each layer
    cfg = model.config
    export_id = uuid.uuid4().hex
    modules = {
        "A": PartA(model),
        "B": PartB(model),
        "C": PartC(),
        "D": PartD(model),
        "E": PartE(model),
        "F": PartF(model),
    }
    manifest_parts = {}
    bar = tqdm(parts, desc="export", unit="part", disable=not progress, file=sys.stderr)
    for part in bar:
        bar.set_postfix_str(f"{part}: {PART_ROLES[part]}")
        kv_int8 = fused and part == "F" and kv_cache == "int8"
        ins, outs = io_spec(cfg, part, "float32", "int8" if kv_int8 else None)
        path = out_dir / part_file(part)
        if fused and part == "B":
            model.visual.fuse_attention()  # ONNX's Attention operator, from opset 23 on
        if fused and part == "F":
            from slimm.export.fused import calibrate_kv_scales, fused_decoder

            scales = calibrate_kv_scales(model, ckpt_dir) if kv_int8 else None
            _save(fused_decoder(model, cfg, ins, outs, kv_scales=scales), path)
        else:
            with torch.no_grad():
                args = example_inputs(cfg, part, torch.float32)
                _quiet_export(
                    modules[part],
                    args,
                    path,
                    ins,
                    outs,
                    dynamic_shapes(part, ins, cfg.text.num_hidden_layers),
                    max(opset, ATTENTION_OPSET) if fused and part == "B" else opset,
                )
        if precision == "fp16":
            _to_fp16_weights(path)
        _stamp(path, export_id, part)
        data = out_dir / (path.name + ".data")
        if data.exists() and data.stat().st_size == 0:
            data.unlink()
        manifest_parts[part] = Part(
            PART_ROLES[part],
            ins,
            outs,
            file=path.name,
            data=data.name if data.exists() else None,
            contrib_ops=contrib_ops(path),
        )
    copied = []
    for name in RUNTIME_FILES:
        if (ckpt_dir / name).exists():
            shutil.copyfile(ckpt_dir / name, out_dir / name)
            copied.append(name)
    Manifest(
        export_id=export_id,
        max_seq_len=max_seq_len,
        config=cfg,
        parts=manifest_parts,
        precision=precision,
        weights_dtype="float16" if precision == "fp16" else "float32",
        opset=opset,
        tokenizer="tokenizer.json" in copied,
        files=copied,
        source=str(ckpt_dir.resolve()),
    ).write(out_dir)
