"""The `slimm` command: every CLI command is a function here, wired into one argparse tree.

Errors a user can cause print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from slimm.config import DEFAULT_MAX_SEQ_LEN
from slimm.errors import InputError, SliMMError
from slimm.export.quantize import PRECISIONS as QUANTIZED
from slimm.export.quantize import WEIGHT_ONLY

DEFAULT_STOP_TOKENS = (151643, 151645)  # <|endoftext|>, <|im_end|>: the specification's STOP_TOKEN


def cache_dir() -> Path:
    root = os.environ.get("SLIMM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimm"
    )
    return Path(root)


def demo_model_dir(variant: str = "plain", size: str = "tiny") -> Path:
    """The built-in demo checkpoint, written once into the cache directory."""
    from slimm.demo import write_demo_checkpoint

    path = cache_dir() / f"demo-{size}-{variant}"
    if not (path / "model.safetensors").exists():
        print(
            f"building the {size} {variant} demo checkpoint (random weights) in {path} ...", file=sys.stderr
        )
        write_demo_checkpoint(path, variant=variant, size=size)
    return path


def demo_export_dir(variant: str = "plain", size: str = "tiny") -> Path:
    """The demo checkpoint exported to ONNX, written once into the cache directory."""
    from slimm.export import export_model

    path = cache_dir() / f"demo-{size}-{variant}-onnx"
    if not (path / "manifest.json").exists():
        print(f"exporting the demo checkpoint to ONNX in {path} ...", file=sys.stderr)
        export_model(demo_model_dir(variant, size), path)
    return path


def demo_converted_dir(target: str, variant: str = "plain", size: str = "tiny") -> Path:
    """The demo export converted to `target`, written once into the cache directory."""
    from slimm.convert.convert import convert_export

    path = cache_dir() / f"demo-{size}-{variant}-{target}"
    if not (path / "manifest.json").exists():
        print(f"converting the demo export to {target} in {path} ...", file=sys.stderr)
        convert_export(demo_export_dir(variant, size), target, path)
    return path


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image size must look like HxW (e.g. 420x420), got {text!r}"
        ) from None
    if h <= 0 or w <= 0 or h % 28 or w % 28:
        raise argparse.ArgumentTypeError(f"image size {h}x{w}: both sides must be positive multiples of 28")
    return h, w


def _vision_message(args) -> list[dict]:
    """The CLI's images and videos as chat-message items for process_vision_info."""
    opts = {}
    if args.image_size:
        opts.update(resized_height=args.image_size[0], resized_width=args.image_size[1])
    if args.min_pixels:
        opts["min_pixels"] = args.min_pixels
    if args.max_pixels:
        opts["max_pixels"] = args.max_pixels
    items = [{"type": "image", "image": str(p), **opts} for p in args.image]
    for v in args.video:
        p = Path(v)
        if p.is_dir():  # a directory of frames, in name order
            frames = sorted(
                str(f) for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")
            )
            if not frames:
                raise InputError(f"{p}: directory holds no .png/.jpg frames")
            items.append({"type": "video", "video": frames, **opts})
        else:
            items.append({"type": "video", "video": str(p), **opts})
    return items


def cmd_generate(args) -> int:
    import slimm
    from slimm.generate import stream_generate
    from slimm.model.utils_vl import process_vision_info

    onnx_like = args.backend == "onnx" or args.backend.endswith("-ort")
    if args.model:
        model_dir = args.model
    elif args.backend == "torch":
        model_dir = demo_model_dir()
    else:
        model_dir = demo_export_dir() if onnx_like else demo_converted_dir(args.backend)
    kwargs = {"device": args.device}
    if args.backend == "torch":
        kwargs["dtype"] = args.dtype
    if onnx_like:
        kwargs.update(threads=args.threads, opt_level=args.opt_level)
    elif args.backend != "torch" and args.threads:
        kwargs["threads"] = args.threads
    model = slimm.load(model_dir, backend=args.backend, **kwargs)
    if model.processor is None:
        raise InputError(f"{model_dir}: no tokenizer files, so a text prompt cannot be encoded")
    items = _vision_message(args)
    messages = [{"role": "user", "content": items + [{"type": "text", "text": args.prompt}]}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    images, videos = process_vision_info(messages)
    text = model.processor.apply_chat_template(messages, add_generation_prompt=True)
    from slimm.backends.base import normalize_inputs

    inputs = normalize_inputs(model.processor(text=[text], images=images, videos=videos))
    gen = model.generation_config(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=list(args.stop_token),
        max_seq_len=args.max_seq_len,
        seed=args.seed,
    )
    t0, n = time.perf_counter(), 0
    for piece in stream_generate(model, inputs, model.processor.tokenizer, gen):
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{args.backend}] prompt {inputs['input_ids'].shape[1]} tokens, {dt:.2f} s", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    import shutil
    import tempfile

    from slimm.export import export_model

    model = args.model or demo_model_dir()
    if args.block_size is not None and args.precision not in WEIGHT_ONLY:
        raise InputError(f"--block-size applies to int8 / int4 exports, not {args.precision}")
    if args.precision in QUANTIZED:
        # quantization rewrites an fp32 export (MatMulNBits / MatMulInteger / GatherBlockQuantized)
        from slimm.export.quantize import BLOCK_SIZE, check_block_size, quantize_export

        check_block_size(args.block_size or BLOCK_SIZE)  # before the minutes of the fp32 export
        tmp = Path(
            tempfile.mkdtemp(prefix="slimm-fp32-", dir=args.out.parent if args.out.parent.exists() else None)
        )
        try:
            export_model(model, tmp, opset=args.opset, max_seq_len=args.max_seq_len)
            out = quantize_export(tmp, args.out, args.precision, block_size=args.block_size or BLOCK_SIZE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        out = export_model(
            model, args.out, precision=args.precision, opset=args.opset, max_seq_len=args.max_seq_len
        )
    print(f"wrote {out}: {', '.join(f'SliMM_{p}.onnx' for p in 'ABCDEF')} + manifest.json")
    return 0


def cmd_convert(args) -> int:
    from slimm.convert import TARGETS
    from slimm.convert.convert import convert_export

    targets = list(TARGETS) if args.to == "all" else [args.to]
    if {"paddle", "mindspore"} <= set(targets) and importlib.util.find_spec("mindspore"):
        # both wheels ship a libdnnl.so.3 and MindSpore only loads if its copy comes first
        from slimm.wrappers import mindspore_startup

        mindspore_startup()
    for target in targets:
        out = args.out / target if args.to == "all" else args.out
        convert_export(args.export_dir, target, out, validate=args.validate)
        print(f"wrote {out} ({target})")
    return 0


def cmd_operators(args) -> int:
    from slimm.convert.optable import operators_markdown

    sys.stdout.write(operators_markdown())
    return 0


def _missing_bench(err: Exception) -> int:
    raise InputError(
        f"the benchmark suite (benchmarks/) is not importable here ({err}); install slimm from a checkout"
    )


def cmd_bench(args) -> int:
    from benchmarks.bench import run

    return run(args)


def cmd_demo_checkpoint(args) -> int:
    from slimm.demo import write_demo_checkpoint

    path = write_demo_checkpoint(
        args.out, variant=args.variant, size=args.size, seed=args.seed, dtype=args.dtype
    )
    print(f"wrote {path} ({args.size}, {args.variant}; random weights: its text is meaningless)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from slimm.backends import BACKENDS
    from slimm.demo import SIZES, VARIANTS

    p = argparse.ArgumentParser(
        prog="slimm",
        description="SliMM inference: run, export and convert the SliMM vision-language model.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="answer a prompt about images / video, streaming the text",
        description="Answer a prompt about images or video frames, streaming the answer to stdout. "
        "With no --model, a tiny random-weight demo checkpoint is built once and used (its text is meaningless).",
    )
    g.add_argument(
        "--model", type=Path, help="checkpoint directory (default: the built-in tiny demo checkpoint)"
    )
    g.add_argument(
        "--backend", default="torch", choices=list(BACKENDS), help="framework to run on (default torch)"
    )
    g.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    g.add_argument(
        "--video", action="append", default=[], help="video file or directory of frames (repeatable)"
    )
    g.add_argument("--prompt", default="Describe this image.", help="the user's question")
    g.add_argument("--system", help="system prompt (default: the chat template's)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--image-size", type=parse_size, metavar="HxW",
                   help="resize every image to this size, multiples of 28 (the specification's INPUT_IMAGE_SIZE "
                        "with HEIGHT_FACTOR/WIDTH_FACTOR: 15x28 = 420x420)")  # fmt: skip
    g.add_argument("--min-pixels", type=int, help="lower bound on image area before patching")
    g.add_argument("--max-pixels", type=int, help="upper bound on image area before patching")
    g.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help=f"prompt + answer tokens at most (MAX_SEQ_LENGTH, default {DEFAULT_MAX_SEQ_LEN})")  # fmt: skip
    g.add_argument("--stop-token", type=int, nargs="+", default=list(DEFAULT_STOP_TOKENS),
                   help="token ids that end the answer (STOP_TOKEN, default 151643 151645)")  # fmt: skip
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu (default), cuda, or auto: CUDA when the framework sees a GPU")  # fmt: skip
    g.add_argument(
        "--threads",
        type=int,
        help="intra-op threads for ONNX Runtime / Paddle / MindSpore (default: the framework's)",
    )
    g.add_argument("--opt-level", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ONNX Runtime graph optimisation level (default all)")  # fmt: skip
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="torch backend weights dtype (default float32)")  # fmt: skip
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser(
        "export",
        help="export a checkpoint to six ONNX parts (A-F) plus manifest.json",
        description="Export a checkpoint to ONNX: SliMM_A token embedding, SliMM_B vision encoder, SliMM_C fusion, "
        "SliMM_D M-RoPE, SliMM_E rotary, SliMM_F decoder with KV cache; plus manifest.json and the tokenizer, "
        "chat template and preprocessor files, so the directory runs with onnxruntime alone.",
    )
    e.add_argument(
        "--model", type=Path, help="checkpoint directory (default: the built-in tiny demo checkpoint)"
    )
    e.add_argument("--out", type=Path, required=True, help="export directory to write")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", *QUANTIZED],
                   help="fp16 stores weights in float16, computing in float32; int8 / int4 quantize weights "
                        "(ONNX Runtime's MatMulNBits) for fast CPU decoding; w8a8 quantizes weights and "
                        "activations (int8 GEMMs, vision tower included) for fast vision encode and "
                        "prefill. All three run on ONNX Runtime only; see benchmarks/README.md")  # fmt: skip
    e.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="int8 / int4: weights per scale along the reduction axis (default 32; 128 decodes "
                        "faster and is less accurate, see benchmarks/README.md)")  # fmt: skip
    e.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20; 18 or newer)")
    e.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help=f"KV cache capacity and longest prompt + answer (default {DEFAULT_MAX_SEQ_LEN})")  # fmt: skip
    e.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "convert",
        help="convert an export directory to native JAX / PaddlePaddle / MindSpore models",
        description="Convert the six ONNX parts of an export directory into each framework's own code and "
        "deployable format (JAX: jax.export StableHLO; Paddle: paddle.jit.save inference model; MindSpore: "
        "MINDIR). The result runs with that framework alone: `slimm generate --backend jax --model OUT`.",
    )
    c.add_argument("export_dir", type=Path, help="directory written by `slimm export`")
    c.add_argument("--to", required=True, choices=["jax", "paddle", "mindspore", "all"])
    c.add_argument(
        "--out", type=Path, required=True, help="directory to write (with --to all: one subdirectory each)"
    )
    c.add_argument("--validate", action="store_true",
                   help="check every intermediate tensor against ONNX Runtime and name the first that diverges")  # fmt: skip
    c.set_defaults(func=cmd_convert)

    o = sub.add_parser(
        "operators",
        help="print the table of ONNX operators each conversion target supports (docs/operators.md)",
        description="Print, as Markdown, the ONNX operators and opset versions each conversion target handles, "
        "generated from the converter registries.",
    )
    o.set_defaults(func=cmd_operators)

    b = sub.add_parser(
        "bench",
        help="measure speed and memory of every backend on a random-weight checkpoint",
        description="Build (or reuse) a random-weight checkpoint of the chosen size, export and convert it, and "
        "time every backend on the same inputs (one subprocess each): vision encode, prefill, time to first "
        "token, decode tokens/s against the memory-bandwidth roofline, compile time, peak memory. "
        "Writes table.md, results.json and chart.png.",
    )
    try:  # the benchmark suite ships beside the package (benchmarks/), not inside it
        from benchmarks.bench import add_arguments
    except ImportError as e:
        b.set_defaults(func=lambda args: _missing_bench(e))
    else:
        add_arguments(b)
        b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "demo-checkpoint",
        help="write a seeded random-weight checkpoint in the released format",
        description="Write a checkpoint directory in exactly the released SliMM format, with seeded random "
        "weights and the real Qwen tokenizer. 0.5b and 2b have the released architectures' sizes.",
    )
    d.add_argument("out", type=Path, help="directory to write")
    d.add_argument("--variant", default="plain", choices=list(VARIANTS))
    d.add_argument("--size", default="tiny", choices=list(SIZES))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    d.set_defaults(func=cmd_demo_checkpoint)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SliMMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
