"""slimm.tensorfile reads safetensors files exactly as the safetensors package does, with clear
errors for damaged files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slimm.errors import CheckpointError
from slimm.tensorfile import iter_tensors, read_header


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False, True]),
    }


def test_same_tensors_as_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    ref = load_file(str(path))
    got = {}
    for key, kind, arr in iter_tensors(path):
        t = torch.from_numpy(arr)
        got[key] = t.view(torch.bfloat16) if kind == "BF16" else t
    assert set(got) == set(ref)
    for key, t in ref.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert torch.equal(got[key], t), key
    # the arrays are the process's own memory, not views of a mapped file
    assert all(arr.flags.owndata and arr.flags.writeable for _, _, arr in iter_tensors(path))


def test_selected_keys_in_given_order(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    assert [k for k, _, _ in iter_tensors(path, ["i64", "f32"])] == ["i64", "f32"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge_header"])
def test_damaged_file_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-8])
    elif damage == "garbage":
        path.write_bytes(data[:8] + b"not json" + data[16:])
    else:
        path.write_bytes(np.array([2**40], "<u8").tobytes() + data[8:])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        read_header(path)
        list(iter_tensors(path))
