"""Tests for slimm.wrappers: tiny ONNX models built with onnx.helper, run through every wrapper with that
framework's tensors, checked against NumPy; plus saving, error messages and the MindSpore start-up fix."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prompts import run_python

from slimm import frameworks
from slimm.errors import BackendUnavailable, CheckpointError, InputError
from slimm.frameworks.mindspore import take_numpy_init_failure
from slimm.wrappers import WRAPPERS, NumpyWrapper, ORTWrapper, TorchWrapper

# The wrappers exist to run ONNX models: without onnx (to build them) and onnxruntime there is nothing to test.
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto

W = (np.arange(12, dtype=np.float32).reshape(4, 3) / 4).astype(np.float32)
E = (np.arange(30, dtype=np.float32).reshape(10, 3) - 5).astype(np.float32)
# Multiples of 1/4: exact in float16/32/64, so every dtype path must give the same numbers.
X = (np.random.default_rng(0).integers(-8, 8, size=(2, 4)) / 4).astype(np.float32)
IDS = np.array([3, 7], dtype=np.int64)
SCORES = np.array([[0.5, 2.0, -1.0, 3.0, 1.0], [4.0, -2.0, 0.0, 1.5, 2.5]], dtype=np.float32)


def expected_mix(x, ids):
    return np.asarray(x, np.float32) @ W + E[np.asarray(ids)]


def _save(graph, path: Path) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("wrapper-models")
    vi = helper.make_tensor_value_info
    # y = x @ W + E[ids]: a float input, an int64 input, MatMul, Gather, Add.
    mix = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Gather", ["E", "ids"], ["e"], axis=0),
            helper.make_node("Add", ["xw", "e"], ["y"]),
        ],
        "mix",
        [vi("x", TensorProto.FLOAT, ["batch", 4]), vi("ids", TensorProto.INT64, ["batch"])],
        [vi("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(E, "E")],
    )
    # TopK: one op with two outputs of different dtypes.
    topk = helper.make_graph(
        [helper.make_node("TopK", ["scores", "k"], ["values", "indices"], axis=-1)],
        "topk",
        [vi("scores", TensorProto.FLOAT, ["batch", 5])],
        [vi("values", TensorProto.FLOAT, ["batch", 2]), vi("indices", TensorProto.INT64, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.array([2], np.int64), "k")],
    )
    # Where(mask, a, 0): a bool input and a float16 input/output.
    where = helper.make_graph(
        [helper.make_node("Where", ["mask", "a", "zero"], ["out"])],
        "where",
        [vi("mask", TensorProto.BOOL, ["n"]), vi("a", TensorProto.FLOAT16, ["n"])],
        [vi("out", TensorProto.FLOAT16, ["n"])],
        initializer=[numpy_helper.from_array(np.array(0, np.float16), "zero")],
    )
    return SimpleNamespace(
        mix=_save(mix, d / "mix.onnx"),
        topk=_save(topk, d / "topk.onnx"),
        where=_save(where, d / "where.onnx"),
    )


# ---- frameworks -------------------------------------------------------------------------------------------


@dataclass
class Framework:
    name: str
    cls: type[ORTWrapper]
    tensor: Callable[[np.ndarray], Any]  # NumPy -> this framework's tensor
    tensor_type: type
    to_np: Callable[[Any], np.ndarray]
    bf16: Callable[[np.ndarray], Any]  # NumPy float32 -> a bfloat16 tensor
    int_out: np.dtype = np.dtype(np.int64)  # what an int64 model output becomes


def _numpy() -> Framework:
    def bf16(a):
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (NumPy's bfloat16) is not installed")
        return a.astype(ml_dtypes.bfloat16)

    return Framework("numpy", WRAPPERS["numpy"], np.array, np.ndarray, np.asarray, bf16)


def _torch() -> Framework:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    return Framework(
        "torch",
        WRAPPERS["torch"],
        lambda a: torch.from_numpy(a.copy()),
        torch.Tensor,
        lambda t: t.numpy(),
        lambda a: torch.from_numpy(a).bfloat16(),
    )


def _mindspore() -> Framework:
    pytest.importorskip("mindspore", reason="MindSpore is not installed")
    ms = frameworks.startup("mindspore")
    return Framework(
        "mindspore",
        WRAPPERS["mindspore"],
        ms.Tensor,
        ms.Tensor,
        lambda t: t.asnumpy(),
        lambda a: ms.Tensor(a).astype(ms.bfloat16),
    )


def _paddle() -> Framework:
    pytest.importorskip("paddle", reason="PaddlePaddle is not installed")
    paddle = frameworks.startup("paddle")  # MindSpore's oneDNN first: then test order does not matter
    return Framework(
        "paddle",
        WRAPPERS["paddle"],
        paddle.to_tensor,
        paddle.Tensor,
        lambda t: t.numpy(),
        lambda a: paddle.to_tensor(a).astype("bfloat16"),
    )


def _jax() -> Framework:
    jax = pytest.importorskip("jax", reason="JAX is not installed")
    import jax.numpy as jnp

    return Framework(
        "jax",
        WRAPPERS["jax"],
        jnp.asarray,
        jax.Array,
        np.asarray,
        lambda a: jnp.asarray(a, jnp.bfloat16),
        int_out=np.dtype(jax.dtypes.canonicalize_dtype(np.int64)),  # int32 unless jax_enable_x64
    )


FRAMEWORKS = {"numpy": _numpy, "torch": _torch, "mindspore": _mindspore, "paddle": _paddle, "jax": _jax}


@pytest.fixture(params=list(FRAMEWORKS))
def fw(request) -> Framework:
    return FRAMEWORKS[request.param]()


def test_every_wrapper_is_tested():
    assert set(FRAMEWORKS) == set(WRAPPERS)


# ---- per framework ----------------------------------------------------------------------------------------


def test_tensors_in_and_out(fw, models):
    w = fw.cls(models.mix)
    assert w.input_names == ("x", "ids") and w.output_names == ("y",)
    y = w(fw.tensor(X), fw.tensor(IDS))
    assert isinstance(y, fw.tensor_type)  # a single output comes back alone
    y = fw.to_np(y)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected_mix(X, IDS), rtol=1e-6)

    w2 = fw.cls(models.topk)
    out = w2(fw.tensor(SCORES))
    assert isinstance(out, tuple) and len(out) == 2
    assert all(isinstance(o, fw.tensor_type) for o in out)
    values, indices = (fw.to_np(o) for o in out)
    order = np.argsort(-SCORES, axis=-1)[:, :2]
    np.testing.assert_array_equal(indices, order)
    assert indices.dtype == fw.int_out
    np.testing.assert_array_equal(values, np.take_along_axis(SCORES, order, -1))

    d = w2.run_dict(scores=fw.tensor(SCORES))
    assert list(d) == ["values", "indices"]
    np.testing.assert_array_equal(fw.to_np(d["indices"]), order)


def test_dtypes_are_converted(fw, models):
    w = fw.cls(models.mix)
    x64, ids32 = X.astype(np.float64), IDS.astype(np.int32)
    x_in, ids_in = fw.tensor(x64), fw.tensor(ids32)
    if fw.to_np(x_in).dtype != np.float64:
        x_in = x64  # JAX without x64 cannot hold float64: pass NumPy (mixed inputs must work too)
    assert fw.to_np(ids_in).dtype == np.int32
    y = fw.to_np(w(x_in, ids_in))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected_mix(X, IDS), rtol=1e-6)

    # int64 0/1 -> bool, float32 -> float16, and a float16 output back in the framework.
    w2 = fw.cls(models.where)
    mask, a = np.array([1, 0, 1], np.int64), np.array([1.5, 2.0, -3.25], np.float32)
    out = w2(mask=fw.tensor(mask), a=fw.tensor(a))
    assert isinstance(out, fw.tensor_type)
    out = fw.to_np(out)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.where(mask.astype(bool), a, 0).astype(np.float16))

    # bfloat16 has no NumPy dtype of its own (Paddle's .numpy() even hands back the bits as uint16).
    np.testing.assert_allclose(fw.to_np(w(fw.bf16(X), fw.tensor(IDS))), expected_mix(X, IDS), rtol=1e-6)

    # Float -> int would hide a bug upstream (token ids as floats): an error naming the input.
    with pytest.raises(InputError, match=r"mix\.onnx: input 'ids' expects int64.*got float32"):
        w(fw.tensor(X), fw.tensor(IDS.astype(np.float32)))


def test_positional_and_keyword_inputs(fw, models):
    w = fw.cls(models.mix)
    expect = expected_mix(X, IDS)
    x, ids = fw.tensor(X), fw.tensor(IDS)
    for y in (w(x, ids), w(x=x, ids=ids), w(ids=ids, x=x), w(x, ids=ids)):
        np.testing.assert_allclose(fw.to_np(y), expect, rtol=1e-6)


def test_wrong_rank_and_shape(fw, models):
    w = fw.cls(models.mix)
    with pytest.raises(InputError, match=r"mix\.onnx: input 'x' expects rank 2 \(batch, 4\), got rank 3"):
        w(fw.tensor(X[None]), fw.tensor(IDS))
    with pytest.raises(InputError, match=r"mix\.onnx: input 'ids' expects rank 1 \(batch,\), got rank 2"):
        w(fw.tensor(X), fw.tensor(IDS[None]))
    with pytest.raises(InputError, match=r"input 'x' expects shape \(batch, 4\), got \(2, 5\)"):
        w(fw.tensor(np.ones((2, 5), np.float32)), fw.tensor(IDS))


def test_unknown_and_missing_input_names(fw, models):
    w = fw.cls(models.mix)
    x, ids = fw.tensor(X), fw.tensor(IDS)
    with pytest.raises(InputError, match=r"mix\.onnx has no input 'idz'; its inputs are x, ids"):
        w(x, idz=ids)
    with pytest.raises(InputError, match=r"mix\.onnx is missing input\(s\) ids; its inputs are x, ids"):
        w(x)
    with pytest.raises(InputError, match=r"missing input\(s\) x, ids"):
        w()
    with pytest.raises(InputError, match=r"takes 2 inputs \(x, ids\), got 3 positional"):
        w(x, ids, ids)
    with pytest.raises(InputError, match=r"'x' given positionally and by name"):
        w(x, x=x, ids=ids)


def test_pkl_round_trip(fw, models, tmp_path):
    w = fw.cls(models.topk, device="cpu", intra_op_num_threads=1, graph_optimization_level="basic")
    expect = [fw.to_np(o) for o in w(fw.tensor(SCORES))]
    path = w.save(tmp_path / "w.pkl")
    for loaded in (ORTWrapper.load(path), fw.cls.load(path), pickle.loads(pickle.dumps(w))):
        assert type(loaded) is fw.cls
        assert loaded.model_path == Path(models.topk)
        so = loaded.session.get_session_options()
        assert so.intra_op_num_threads == 1  # the options are applied again, not just stored
        assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
        for a, b in zip(expect, loaded(fw.tensor(SCORES)), strict=True):
            np.testing.assert_array_equal(a, fw.to_np(b))


def test_pkl_of_a_deleted_model(fw, models, tmp_path):
    model = tmp_path / "gone.onnx"
    model.write_bytes(Path(models.mix).read_bytes())
    w = fw.cls(model)
    path, blob = w.save(tmp_path / "w.pkl"), pickle.dumps(w)
    model.unlink()
    with pytest.raises(
        CheckpointError, match=rf"w\.pkl refers to ONNX model {model}, which no longer exists"
    ):
        ORTWrapper.load(path)
    with pytest.raises(CheckpointError, match=rf"ONNX model {model} does not exist"):
        pickle.loads(blob)


@pytest.mark.parametrize(
    "name, module, package",
    [
        ("numpy", "onnxruntime", "onnxruntime"),
        ("torch", "torch", "torch"),
        ("mindspore", "mindspore", "mindspore"),
        ("paddle", "paddle", "paddlepaddle"),
        ("jax", "jax", "jax"),
    ],
)
def test_missing_framework_is_backend_unavailable(name, module, package, models, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise ImportError
    with pytest.raises(BackendUnavailable, match=rf"pip install {package}`"):
        WRAPPERS[name](models.mix)


# ---- framework-independent behaviour ----------------------------------------------------------------------


def test_importing_wrappers_imports_no_framework():
    code = (
        "import sys, slimm.wrappers\n"
        "print([m for m in ('torch', 'mindspore', 'paddle', 'jax', 'onnxruntime') if m in sys.modules])"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_device_and_provider_options(models, tmp_path):
    import onnxruntime as ort

    assert NumpyWrapper(models.mix, device="cpu").providers == ["CPUExecutionProvider"]
    assert NumpyWrapper(models.mix, providers=["CPUExecutionProvider"]).providers == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert NumpyWrapper(models.mix).providers == ["CPUExecutionProvider"]  # auto
        with pytest.raises(BackendUnavailable, match="device='cuda' needs CUDAExecutionProvider"):
            NumpyWrapper(models.mix, device="cuda")
    with pytest.raises(BackendUnavailable, match="FooExecutionProvider not available"):
        NumpyWrapper(models.mix, providers=["FooExecutionProvider"])
    with pytest.raises(InputError, match="device must be one of auto, cpu, cuda"):
        NumpyWrapper(models.mix, device="gpu")
    with pytest.raises(InputError, match="providers and device were both given"):
        NumpyWrapper(models.mix, providers=["CPUExecutionProvider"], device="cpu")
    with pytest.raises(InputError, match="graph_optimization_level must be one of"):
        NumpyWrapper(models.mix, graph_optimization_level="max")
    with pytest.raises(CheckpointError, match="nothere.onnx does not exist"):
        NumpyWrapper(tmp_path / "nothere.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=r"could not load .*bad\.onnx"):
        NumpyWrapper(tmp_path / "bad.onnx")


class _Touch:
    """Pickles as a call of Path.touch: what a tampered .pkl could do with a plain unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_load_accepts_plain_data_only(models, tmp_path):
    w = NumpyWrapper(models.mix)
    good = w.__getstate__()

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({**good, "options": _Touch(marker)}))
    with pytest.raises(CheckpointError, match="refusing to load pathlib"):
        ORTWrapper.load(evil)
    assert not marker.exists()

    for bad, match in [
        ({**good, "version": 99}, "format version 99"),
        ({**good, "extra": 1}, "is not a saved ORTWrapper"),
        ({**good, "options": {**good["options"], "device": "tpu"}}, "device must be one of"),
        ({**good, "options": {**good["options"], "model_path": "relative.onnx"}}, "absolute path"),
        ({**good, "class": "os.system"}, "os.system, which is not loaded here"),
        ([1, 2], "is not a saved ORTWrapper"),
    ]:
        p = tmp_path / "bad.pkl"
        p.write_bytes(pickle.dumps(bad))
        with pytest.raises(CheckpointError, match=match):
            ORTWrapper.load(p)

    path = w.save(tmp_path / "numpy.pkl")
    with pytest.raises(CheckpointError, match="holds a NumpyWrapper, not a TorchWrapper"):
        TorchWrapper.load(path)


class _Doubling(NumpyWrapper):
    """A user's own subclass: load() has to give it back."""

    def from_numpy(self, array, device=None):
        return array * 2


def test_user_subclass_round_trip(models, tmp_path):
    w = _Doubling(models.mix)
    loaded = ORTWrapper.load(w.save(tmp_path / "d.pkl"))
    assert type(loaded) is _Doubling
    np.testing.assert_allclose(loaded(X, IDS), 2 * expected_mix(X, IDS), rtol=1e-6)


class _OnDevice(NumpyWrapper):
    """Inputs wrapped in a tuple ("dev", array) claim to live on device "dev"."""

    _tracks_device = True

    def to_numpy(self, x):
        return np.asarray(x[1] if isinstance(x, tuple) else x)

    def input_device(self, x):
        return x[0] if isinstance(x, tuple) else None

    def from_numpy(self, array, device=None):
        return (device, array)


def test_outputs_follow_the_first_accelerator_input(models):
    w = _OnDevice(models.mix)
    assert w(X, IDS)[0] is None
    assert w(X, ("gpu:1", IDS))[0] == "gpu:1"
    assert w(("gpu:0", X), ids=("gpu:1", IDS))[0] == "gpu:0"
    assert w.run_dict(x=X, ids=("gpu:1", IDS))["y"][0] == "gpu:1"


def test_torch_cuda_in_cuda_out(models):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w = WRAPPERS["torch"](models.mix)
    y = w(torch.from_numpy(X).cuda(), torch.from_numpy(IDS))
    assert y.device.type == "cuda"
    np.testing.assert_allclose(y.cpu().numpy(), expected_mix(X, IDS), rtol=1e-6)
    assert w(torch.from_numpy(X), torch.from_numpy(IDS)).device.type == "cpu"


# ---- MindSpore start-up -----------------------------------------------------------------------------------


class _FakeOut:
    def __init__(self, value):
        self.value = np.asarray(value)
        self.shape = self.value.shape

    def asnumpy(self):
        return self.value


def _fake_mindspore(*behaviours):
    """A stand-in module whose ops.reshape acts out `behaviours` in turn (an exception is raised)."""
    calls = []

    def reshape(t, shape):
        b = behaviours[len(calls)]
        calls.append(shape)
        if isinstance(b, BaseException):
            raise b
        return b

    return SimpleNamespace(ops=SimpleNamespace(reshape=reshape), Tensor=lambda a: a), calls


def _numpy_init_error() -> SystemError:
    e = SystemError("<built-in method pyboost_reshape> returned a result with an exception set")
    e.__cause__ = ImportError("numpy.core.multiarray failed to import")
    return e


def test_startup_takes_the_numpy_error_once():
    ms, calls = _fake_mindspore(_numpy_init_error(), _FakeOut([[7]]))
    take_numpy_init_failure(ms)
    assert len(calls) == 2

    ms, calls = _fake_mindspore(_FakeOut([[7]]))  # NumPy 1.x, or already settled: one call
    take_numpy_init_failure(ms)
    assert len(calls) == 1


def test_startup_lets_other_errors_through():
    ms, _ = _fake_mindspore(SystemError("something else"))
    with pytest.raises(SystemError, match="something else"):
        take_numpy_init_failure(ms)
    ms, _ = _fake_mindspore(_numpy_init_error(), RuntimeError("still broken"))
    with pytest.raises(RuntimeError, match="still broken"):
        take_numpy_init_failure(ms)
    ms, _ = _fake_mindspore(_numpy_init_error(), _FakeOut([[8]]))
    with pytest.raises(BackendUnavailable, match="start-up check failed"):
        take_numpy_init_failure(ms)


GLOG_ERRORS_ONLY = {**os.environ, "GLOG_v": "3"}  # MindSpore's C++ log in a fresh process


def test_mindspore_startup_in_a_fresh_process():
    pytest.importorskip("mindspore", reason="MindSpore is not installed")
    # A fresh process: the failure happens once per process, and this one has seen it already.
    out = run_python(
        "import numpy as np\n"
        "from slimm import frameworks\n"
        "ms = frameworks.startup('mindspore')\n"
        "print(ms.ops.reshape(ms.Tensor(np.arange(6.0)), (2, 3)).shape)\n",
        env=GLOG_ERRORS_ONLY,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("(2, 3)")
    assert "compiled using NumPy 1.x" not in out.stderr


def test_mindspore_after_paddle_is_a_clear_error():
    pytest.importorskip("mindspore", reason="MindSpore is not installed")
    pytest.importorskip("paddle", reason="PaddlePaddle is not installed")
    out = run_python(
        "import paddle\n"
        "from slimm.errors import BackendUnavailable\n"
        "from slimm import frameworks\n"
        "try:\n"
        "    frameworks.startup('mindspore')\n"
        "    print('imported')\n"
        "except BackendUnavailable as e:\n"
        "    print('BackendUnavailable:', e)\n",
        env=GLOG_ERRORS_ONLY,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # If a future pair of wheels stops clashing, importing is fine too; what must not happen is an
    # unexplained ImportError.
    last = out.stdout.strip().splitlines()[-1]
    assert (
        last == "imported"
        or "import mindspore (or call slimm.frameworks.startup('mindspore' or 'paddle')) before paddle"
        in last
    )


# ---- damaged files and out-of-range options ---------------------------------------------------------------


def test_damaged_pkl_is_a_checkpoint_error_naming_the_file(models, tmp_path):
    """Seeded random byte flips over every region of a saved wrapper: each load gives a wrapper (the
    flip left a valid file, e.g. another thread count) or a CheckpointError naming the file; never
    OverflowError, TypeError, MemoryError... from inside the unpickler or the option checks."""
    good = NumpyWrapper(models.mix, device="cpu", intra_op_num_threads=1).save(tmp_path / "good.pkl")
    data = good.read_bytes()
    rng = np.random.default_rng(11)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(400):
        damaged = bytearray(data)
        for pos in rng.choice(len(data), size=int(rng.integers(1, 4)), replace=False):
            damaged[pos] ^= int(rng.integers(1, 256))
        path = tmp_path / f"flip{i}.pkl"
        path.write_bytes(bytes(damaged))
        try:
            ORTWrapper.load(path)
            outcomes["loaded"] += 1
        except CheckpointError as e:
            assert str(path) in str(e), f"message does not name the file: {e}"
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the test's point: nothing else may come out
            pytest.fail(f"flip {i}: {type(e).__name__}: {e} (bytes {bytes(damaged)!r})")
    assert outcomes["refused"] > 300  # most flips break the file; the loop really exercised damage
    # truncated at every length
    for n in range(len(data)):
        path = tmp_path / "cut.pkl"
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="cut.pkl"):
            ORTWrapper.load(path)


def test_absurd_thread_count_is_an_option_error(models):
    for n in (10**9, -1, 2.5, True):
        with pytest.raises(InputError, match=r"option intra_op_num_threads must be an int from 0 .* to 1024"):
            NumpyWrapper(models.mix, intra_op_num_threads=n)
    assert NumpyWrapper(models.mix, intra_op_num_threads=0).session  # 0: ONNX Runtime decides
