"""Checkpoint -> export directory: the six ONNX parts (export), their quantized copies (quantize) and
the manifest that describes them (manifest, torch-free). `export_model` is imported on first use so
that runtimes reading a manifest do not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_model", "quantize_export"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from slimm.export.export import export_model

        return export_model
    if name == "quantize_export":
        from slimm.export.quantize import quantize_export

        return quantize_export
    raise AttributeError(f"module 'slimm.export' has no attribute {name!r}")
