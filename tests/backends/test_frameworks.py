"""slimm.frameworks: one registry that the backends, wrappers and benchmarks read; each framework
starts quietly (its chatter shown with SLIMM_VERBOSE=1) and with its start-up quirks handled."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from prompts import run_python

from slimm import frameworks
from slimm.backends import BACKENDS
from slimm.errors import InputError


def test_one_registry_read_by_backends_and_wrappers():
    from slimm.wrappers import WRAPPERS

    assert tuple(WRAPPERS) == frameworks.TENSOR_FRAMEWORKS == ("numpy", "torch", "jax", "paddle", "mindspore")
    assert frameworks.TARGETS == ("jax", "paddle", "mindspore")
    assert list(BACKENDS) == [
        "torch",
        "onnx",
        "jax",
        "paddle",
        "mindspore",
        "torch-ort",
        "jax-ort",
        "paddle-ort",
        "mindspore-ort",
    ]
    assert frameworks.FRAMEWORKS["paddle"].package == "paddlepaddle"
    for name in frameworks.FRAMEWORKS:  # every framework module has the same names
        mod = frameworks.get(name)
        for attr in ("startup", "to_numpy", "from_numpy", "device_of"):
            assert callable(getattr(mod, attr)), f"slimm.frameworks.{name} lacks {attr}"
    with pytest.raises(InputError, match="unknown framework 'tensorflow'"):
        frameworks.get("tensorflow")


def test_to_numpy_dispatches_on_the_tensor_type_without_importing():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert frameworks.to_numpy(a) is a
    assert frameworks.to_numpy([[1, 2]]).tolist() == [[1, 2]]
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(frameworks.to_numpy(torch.from_numpy(a).bfloat16()), a)


def _run(code: str, verbose: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLOG_", "SLIMM_VERBOSE", "TF_CPP"))}
    if verbose:
        env["SLIMM_VERBOSE"] = "1"
    return run_python(code, env=env)


# (framework, code run after its start-up that makes it talk, what it says when allowed to)
CHATTY = [
    # "No ccache found" (a Python warning at import)
    ("paddle", "", "No ccache found"),
    # the one-time NumPy 1.x error MindSpore logs through glog when start-up takes it on purpose
    ("mindspore", "", "Numpy init failed"),
]


@pytest.mark.parametrize("name, code, chatter", CHATTY, ids=[c[0] for c in CHATTY])
def test_start_up_is_quiet_unless_verbose(name, code, chatter):
    if not frameworks.installed(name):
        pytest.skip(f"{name} is not installed")
    script = f"from slimm import frameworks\nfw = frameworks.startup({name!r})\n{code}\nprint('ok')\n"
    quiet = _run(script, verbose=False)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip() == "ok"
    assert quiet.stderr == "", f"{name} start-up wrote to stderr:\n{quiet.stderr[-2000:]}"
    loud = _run(script, verbose=True)
    assert chatter in loud.stderr  # the switch really is what silences it


def test_paddle_and_mindspore_in_either_order():
    """Both wheels ship a libdnnl.so.3; starting through slimm.frameworks works in both orders."""
    if not (frameworks.installed("paddle") and frameworks.installed("mindspore")):
        pytest.skip("needs both paddle and mindspore")
    check = (
        "import numpy as np\n"
        "ms = frameworks.startup('mindspore')\n"
        "pd = frameworks.startup('paddle')\n"
        "a = np.array([[1.0, 2.0]], np.float32)\n"
        "print(float((pd.to_tensor(a) @ pd.to_tensor(a.T)).numpy()[0, 0]),"
        " float(ms.ops.matmul(ms.Tensor(a), ms.Tensor(a.T)).asnumpy()[0, 0]))\n"
    )
    for first in ("paddle", "mindspore"):
        code = f"from slimm import frameworks\nframeworks.startup({first!r})\n{check}"
        out = _run(code, verbose=False)
        assert out.returncode == 0, f"{first} first:\n{out.stderr[-2000:]}"
        assert out.stdout.split() == ["5.0", "5.0"]
