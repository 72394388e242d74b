"""The fp32 GEMMs of one vision block at the bench's image (448x448: 1024 patches, width 1280,
MLP 5120), timed in torch (what transformers runs) and in ONNX Runtime (MLAS, what part B runs),
the same threads for both: how much of the vision encode time the GEMMs alone take; and the time the
tower's products (these GEMMs and attention's two) take at the best rate ONNX Runtime's GEMMs reach.

    python -m benchmarks.vision_gemms [--threads 2] [--patches 1024]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.measure import _phase, _timed

# the four GEMMs of a Qwen2-VL vision block (675M tower): name, reduction K, outputs N
SHAPES = (("qkv", 1280, 3840), ("proj", 1280, 1280), ("fc1", 1280, 5120), ("fc2", 5120, 1280))
WIDTH = 1280  # heads x head_dim
BLOCKS = 32


def median_time(fn, *args, repeats: int = 10) -> float:
    """Seconds of fn(*args): the median of `repeats` calls after a first one (benchmarks.measure's
    steady state)."""
    return _phase([_timed(fn, *args)[0] for _ in range(repeats + 1)])["median_s"]


def ort_matmul(w: np.ndarray, m: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.vision_gemms", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--patches", type=int, default=1024, help="rows of every GEMM (448x448 image: 1024)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    m, rng = args.patches, np.random.default_rng(0)
    print("| GEMM | M x K x N | torch ms | torch GFLOP/s | onnxruntime ms | onnxruntime GFLOP/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    total = {"torch": 0.0, "ort": 0.0}
    best_rate = 0.0
    for name, k, n in SHAPES:
        x = rng.standard_normal((m, k), np.float32)
        w = (rng.standard_normal((k, n), np.float32) / np.sqrt(k)).astype(np.float32)
        linear = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            xt = torch.from_numpy(x)
            t_torch = median_time(linear, xt)
        session = ort_matmul(w, m, args.threads)
        t_ort = median_time(session.run, None, {"x": x})
        flops = 2 * m * k * n
        total["torch"] += t_torch
        total["ort"] += t_ort
        best_rate = max(best_rate, flops / t_ort)
        print(
            f"| {name} | {m} x {k} x {n} | {1e3 * t_torch:.1f} | {flops / t_torch / 1e9:.0f} | "
            f"{1e3 * t_ort:.1f} | {flops / t_ort / 1e9:.0f} |"
        )
    print(
        f"\nthe four GEMMs of a block: torch {1e3 * total['torch']:.1f} ms, onnxruntime "
        f"{1e3 * total['ort']:.1f} ms; x {BLOCKS} blocks: {BLOCKS * total['torch']:.2f} s / "
        f"{BLOCKS * total['ort']:.2f} s"
    )
    # a block's products: the four GEMMs, then q k^T and p v over all heads (2 m^2 WIDTH flops each)
    gemms = sum(2 * m * k * n for _, k, n in SHAPES)
    attention = 2 * 2 * m * m * WIDTH
    flops = BLOCKS * (gemms + attention)
    print(
        f"the tower's products: {flops / 1e9:.0f} GFLOP ({BLOCKS * attention / 1e9:.0f} of them attention's q k^T "
        f"and p v); at the best rate ONNX Runtime's GEMMs reach above ({best_rate / 1e9:.0f} GFLOP/s) they "
        f"alone take {flops / best_rate:.2f} s"
    )


if __name__ == "__main__":
    main()
