"""The `slimm` command: every CLI command is a function here, wired into one argparse tree.

Errors a user can cause print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slimm.errors import InputError, SliMMError
from slimm.hub import resolve_model

# Only what building the parser needs is imported here: torch and the frameworks are imported by the
# command that runs, so `slimm --help` stays fast and `--verbose` is seen before any framework starts.
DEFAULT_STOP_TOKENS = (151643, 151645)  # <|endoftext|>, <|im_end|>: the specification's STOP_TOKEN


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none to show (None, off flags) or
    the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


def _images(paths: list[Path], size: tuple[int, int] | None) -> list:
    """--image files (upright by their EXIF orientation); with --image-size, resized to exactly that."""
    if size is None:
        return [str(p) for p in paths]
    from PIL import Image

    from slimm.processing import load_image

    h, w = size
    return [load_image(p, f"image {p}").resize((w, h), Image.Resampling.BICUBIC) for p in paths]


def _videos(paths: list[Path], size: tuple[int, int] | None) -> list:
    """--video items: a folder of frames (in numeric name order) or a video file (PyAV, no torch)."""
    from slimm.processing.messages import fetch_video

    opts = {"resized_height": size[0], "resized_width": size[1]} if size else {}
    return [fetch_video({"type": "video", "video": str(v), **opts}) for v in paths]


def cmd_generate(args) -> int:
    import slimm
    from slimm.backends.base import normalize_inputs
    from slimm.cache import demo_dir_for
    from slimm.config import check_pixel_bounds
    from slimm.generate import GenerationStats, check_generation_settings, stream_generate

    # the checks the API runs too, here before the minutes of loading a model
    check_pixel_bounds(args.min_pixels, args.max_pixels)
    check_generation_settings(
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.repetition_penalty,
        args.max_seq_len,
        args.seed,
    )
    model_dir = resolve_model(args.model) if args.model else demo_dir_for(args.backend)
    model = slimm.load(model_dir, backend=args.backend, **load_options(args))
    gen = model.generation_config(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=list(args.stop_token),
        max_seq_len=args.max_seq_len,
        seed=args.seed,
    )
    if model.processor is None:
        raise InputError(f"{model_dir}: no tokenizer files, so a text prompt cannot be encoded")
    if args.min_pixels is not None or args.max_pixels is not None:
        from slimm.processing import Processor

        model.processor = Processor.from_pretrained(
            model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels
        )
    images, videos = _images(args.image, args.image_size), _videos(args.video, args.image_size)
    inputs = normalize_inputs(model.prepare(args.prompt, images, videos, system=args.system), model.config)
    stats = GenerationStats()
    for piece in stream_generate(model, inputs, model.processor.tokenizer, gen, stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(
        f"[{model.name}] {stats.new_tokens} new tokens (prompt {stats.prompt_tokens}), time to first token "
        f"{stats.time_to_first_token:.2f} s, decode {stats.decode_tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def cmd_export(args) -> int:
    from slimm.export.export import check_export_settings, export_model
    from slimm.outdir import check_out_dir
    from slimm.trained_demo import trained_demo_dir

    # refused before the demo model is unpacked, if it has to be
    check_export_settings(
        args.precision,
        args.block_size,
        args.opset,
        args.max_seq_len,
        fused=args.fused,
        kv_cache=args.kv_cache,
    )
    model = resolve_model(args.model) if args.model else None
    check_out_dir(args.out, source=model, overwrite=args.overwrite)
    if model is not None and (model / "manifest.json").is_file():
        out = _quantize_an_export(model, args)
        print(f"wrote {out}: {', '.join(f'SliMM_{p}.onnx' for p in 'ABCDEF')} + manifest.json")
        return 0
    out = export_model(
        model or trained_demo_dir(),
        args.out,
        precision=args.precision,
        opset=args.opset,
        max_seq_len=args.max_seq_len,
        block_size=args.block_size,
        overwrite=args.overwrite,
        fused=args.fused,
        kv_cache=args.kv_cache,
    )
    print(f"wrote {out}: {', '.join(f'SliMM_{p}.onnx' for p in 'ABCDEF')} + manifest.json")
    return 0


def _quantize_an_export(export: Path, args) -> Path:
    """`slimm export --model EXPORT --precision Q`: the float32 export quantized as it is (what a
    checkpoint's export at Q does after its float32 export), without exporting again."""
    from slimm.config import DEFAULT_MAX_SEQ_LEN
    from slimm.export.quantize import BLOCK_SIZE, quantize_export
    from slimm.export.quantize import PRECISIONS as QUANTIZED

    if args.precision not in QUANTIZED:
        raise InputError(
            f"{export} is already an ONNX export: --model takes a checkpoint, or a float32 export to quantize "
            f"with --precision {' / '.join(QUANTIZED)}"
        )
    fixed = [
        flag
        for flag, given in (
            ("--fused", args.fused),
            ("--kv-cache", args.kv_cache != "float"),
            ("--opset", args.opset != 20),
            ("--max-seq-len", args.max_seq_len != DEFAULT_MAX_SEQ_LEN),
        )
        if given
    ]
    if fixed:
        raise InputError(
            f"{', '.join(fixed)}: set when {export} was exported; quantizing it keeps them (export the checkpoint "
            "with them instead)"
        )
    return quantize_export(
        export, args.out, args.precision, block_size=args.block_size or BLOCK_SIZE, overwrite=args.overwrite
    )


def cmd_convert(args) -> int:
    from slimm.convert import TARGETS
    from slimm.convert.driver import convert_export

    targets = list(TARGETS) if args.to == "all" else [args.to]
    for target in targets:
        out = args.out / target if args.to == "all" else args.out
        convert_export(args.export_dir, target, out, validate=args.validate, overwrite=args.overwrite)
        print(f"wrote {out} ({target})")
    return 0


def export_precisions() -> tuple[str, ...]:
    from slimm.export.manifest import FLOAT_PRECISIONS
    from slimm.export.quantize import PRECISIONS as QUANTIZED

    return (*FLOAT_PRECISIONS, *QUANTIZED)


def cmd_eval(args) -> int:
    from slimm.evaluation import format_report, run_eval

    if args.precision != "fp32":
        if args.model:
            raise InputError(
                f"--precision {args.precision} picks an export of the built-in demo model; an export given with "
                "--model has the precision it was written with (slimm export --precision)"
            )
        if args.precision not in export_precisions():
            raise InputError(f"--precision {args.precision}: not one of {', '.join(export_precisions())}")
    model = args.model
    if model is None:
        from slimm.cache import demo_dir_for

        model = demo_dir_for(args.backend, args.precision)
    report = run_eval(
        data_path=args.data,
        synthetic_n=args.synthetic,
        seed=args.seed,
        model=model,
        backend=args.backend,
        out_json=args.out,
        max_new_tokens=args.max_new_tokens,
        **load_options(args),
    )
    print(format_report(report))
    if args.out is not None:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_operators(args) -> int:
    from slimm.convert.optable import operators_markdown

    sys.stdout.write(operators_markdown())
    return 0


def cmd_bench(args) -> int:
    from benchmarks.bench import run

    return run(args)


def cmd_serve(args) -> int:
    from slimm.serve.app import ServerSettings, run_server

    name = args.served_model_name or (Path(args.model).name if args.model else f"slimm-demo-{args.backend}")
    settings = ServerSettings(
        model_name=name,
        api_key=args.api_key or os.environ.get("SLIMM_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        allow_remote_images=args.allow_remote_images,
        allowed_local_dir=args.allowed_local_dir,
        max_video_frames=args.max_video_frames,
        request_timeout=args.request_timeout,
        visual_cache_mb=args.visual_cache_mb,
    )
    # the same server either way: one process here, or replicas on Ray Serve
    shared = (args.host, args.port, args.max_batch, args.max_queue, args.max_seq_len, settings)
    if args.ray:
        from slimm.serve import ray_serve

        ray_serve.start(
            args.model,
            args.backend,
            *shared,
            replicas=args.replicas,
            ray_address=args.ray_address,
            serve_forever=True,
            **load_options(args),
        )
        return 0
    model = resolve_model(args.model) if args.model else None
    run_server(model, args.backend, *shared, **load_options(args))
    return 0


def cmd_batch(args) -> int:
    from slimm.batch.cluster import import_ray

    import_ray()  # which extra to install, before anything else is read
    from slimm.batch.job import run_batch

    summary = run_batch(
        args.input,
        args.output,
        args.model,
        args.backend,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        ray_address=args.ray_address,
        workers=args.workers,
        batch_size=args.batch_size,
        resume=args.resume,
        **load_options(args),
    )
    print(summary.line(), file=sys.stderr)
    return 0


def cmd_demo_checkpoint(args) -> int:
    from slimm.demo import write_demo_checkpoint

    path = write_demo_checkpoint(
        args.out,
        variant=args.variant,
        size=args.size,
        seed=args.seed,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(f"wrote {path} ({args.size}, {args.variant}; random weights: its text is meaningless)")
    return 0


def load_options(args) -> dict:
    """slimm.load's keywords from the model options every model-running command shares."""
    kwargs = {"device": args.device}
    if args.backend == "torch":
        kwargs["dtype"] = args.dtype
    elif args.threads is not None:
        kwargs["threads"] = args.threads
    if args.backend == "onnx" or args.backend.endswith("-ort"):
        kwargs["opt_level"] = args.opt_level
    return kwargs


def add_model_options(p: argparse.ArgumentParser, backends, default_model: str) -> None:
    """--model, --backend and how the backend runs: the same for generate, eval and serve."""
    p.add_argument("--model", help=f"model directory or Hugging Face hub id (default: {default_model})")
    p.add_argument("--backend", default="torch", choices=list(backends), help="framework to run on")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda", "auto"],
        help="auto: CUDA when the framework sees a GPU",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads for ONNX Runtime / Paddle / MindSpore (default: the framework's)",
    )
    p.add_argument(
        "--opt-level",
        default="all",
        choices=["disable", "basic", "extended", "all"],
        help="ONNX Runtime graph optimisation level",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="torch backend weights dtype",
    )


def add_ray_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join a running Ray cluster: auto (the one `ray start` began on this machine) or HOST:PORT of "
        "its head (default: $RAY_ADDRESS, else a local Ray started in this process)",
    )


class Parser(argparse.ArgumentParser):
    """argparse's own errors as one line, `error: ...`, with exit status 2 like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.bench import add_arguments as add_bench_arguments
    from slimm.backends import BACKENDS
    from slimm.config import DEFAULT_MAX_SEQ_LEN
    from slimm.demo import SIZES, VARIANTS
    from slimm.export.quantize import BLOCK_SIZE
    from slimm.export.quantize import PRECISIONS as QUANTIZED

    p = Parser(
        prog="slimm",
        description="SliMM inference: run, export and convert the SliMM vision-language model.",
    )
    p.add_argument(
        "--verbose", action="store_true", help="show the frameworks' own start-up messages and warnings"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=HelpFormatter, **kw)

    g = command(
        "generate",
        help="answer a prompt about images / video, streaming the text",
        description="Answer a prompt about images or video frames, streaming the answer to stdout. "
        "With no --model, the built-in demo model answers: a tiny SliMM trained on pictures of coloured shapes "
        "(colours, shapes, positions, counts, motion; it knows nothing else).",
    )
    add_model_options(g, BACKENDS, "the built-in demo model")
    g.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    g.add_argument(
        "--video", action="append", default=[], help="video file or directory of frames (repeatable)"
    )
    g.add_argument("--prompt", default="Describe this image.", help="the user's question")
    g.add_argument("--system", help="system prompt (default: the chat template's)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]; 1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off")
    g.add_argument("--seed", type=int, help="random seed for sampling, >= 0")
    g.add_argument(
        "--image-size",
        type=parse_size,
        metavar="HxW",
        help="resize every image to this size, multiples of 28 (the specification's INPUT_IMAGE_SIZE with "
        "HEIGHT_FACTOR/WIDTH_FACTOR: 15x28 = 420x420)",
    )
    g.add_argument(
        "--min-pixels", type=int, help="lower bound on image area before patching (default: the model's)"
    )
    g.add_argument(
        "--max-pixels", type=int, help="upper bound on image area before patching (default: the model's)"
    )
    g.add_argument(
        "--max-seq-len",
        type=int,
        help=f"prompt + answer tokens at most, MAX_SEQ_LENGTH (default: an export's own, {DEFAULT_MAX_SEQ_LEN} "
        "for a checkpoint)",
    )
    g.add_argument(
        "--stop-token",
        type=int,
        nargs="+",
        default=list(DEFAULT_STOP_TOKENS),
        help="token ids that end the answer (STOP_TOKEN)",
    )
    g.set_defaults(func=cmd_generate)

    e = command(
        "export",
        help="export a checkpoint to six ONNX parts (A-F) plus manifest.json",
        description="Export a checkpoint to ONNX: SliMM_A token embedding, SliMM_B vision encoder, SliMM_C fusion, "
        "SliMM_D M-RoPE, SliMM_E rotary, SliMM_F decoder with KV cache; plus manifest.json and the tokenizer, "
        "chat template and preprocessor files, so the directory runs with onnxruntime alone. The directory is "
        "built beside --out and moved into place when complete.",
    )
    e.add_argument(
        "--model",
        help="checkpoint directory or Hugging Face hub id (default: the built-in demo model); or a float32 "
        "export directory, which a quantized --precision then quantizes as it is (no second export)",
    )
    e.add_argument("--out", type=Path, required=True, help="export directory to write")
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out that is not a slimm export (a previous export is always replaced whole)",
    )
    e.add_argument(
        "--precision",
        default="fp32",
        metavar="PRECISION",
        # checked by check_export_settings, whose error also says how a mixed precision is written
        help=f"one of fp32, fp16, {', '.join(QUANTIZED)}. fp16 stores weights in float16, computing in "
        "float32; int8 / int4 quantize weights (ONNX Runtime's MatMulNBits) for fast CPU decoding; w8a8 "
        "quantizes weights and activations (int8 GEMMs, vision tower included) for fast vision encode "
        "and prefill; int4+w8a8 / int8+w8a8 take each phase's faster one: int4 / int8 for decode, w8a8 "
        "for the vision tower and prompts (a second decoder file). All but fp32 / fp16 run on ONNX "
        "Runtime only; see benchmarks/README.md",
    )
    e.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help=f"int8 / int4 (and int4+w8a8 / int8+w8a8): weights per scale along the reduction axis (default {BLOCK_SIZE}; 128 decodes "
        "faster and is less accurate, see benchmarks/README.md)",
    )
    e.add_argument(
        "--fused",
        action="store_true",
        help="write the decoder (SliMM_F) with ONNX Runtime's fused operators (GroupQueryAttention, "
        "SkipSimplifiedLayerNormalization, RotaryEmbedding) for faster decoding, and the vision "
        "encoder's attention (SliMM_B) as ONNX's Attention operator (opset 23); fp32 and every "
        "quantized precision; runs on ONNX Runtime only (slimm convert refuses it)",
    )
    e.add_argument(
        "--kv-cache",
        default="float",
        choices=["float", "int8"],
        help="with --fused: the KV cache's entries; int8 stores them with per-channel scales calibrated on "
        "the checkpoint (a quarter of float32's cache memory; ONNX Runtime's GroupQueryAttention reads them)",
    )
    e.add_argument("--opset", type=int, default=20, help="ONNX opset (18 or newer)")
    e.add_argument(
        "--max-seq-len",
        type=int,
        default=DEFAULT_MAX_SEQ_LEN,
        help="KV cache capacity and longest prompt + answer",
    )
    e.set_defaults(func=cmd_export)

    c = command(
        "convert",
        help="convert an export directory to native JAX / PaddlePaddle / MindSpore models",
        description="Convert the six ONNX parts of an export directory into each framework's own code and "
        "deployable format (JAX: jax.export StableHLO; Paddle: paddle.jit.save inference model; MindSpore: "
        "MINDIR). The result runs with that framework alone: `slimm generate --backend jax --model OUT`.",
    )
    c.add_argument("export_dir", type=Path, help="directory written by `slimm export`")
    c.add_argument(
        "--to", required=True, choices=["jax", "paddle", "mindspore", "all"], help="target framework(s)"
    )
    c.add_argument(
        "--out", type=Path, required=True, help="directory to write (with --to all: one subdirectory each)"
    )
    c.add_argument(
        "--validate",
        action="store_true",
        help="check every intermediate tensor against ONNX Runtime and name the first that diverges",
    )
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not ours")
    c.set_defaults(func=cmd_convert)

    ev = command(
        "eval",
        help="accuracy of a model on questions about images (JSONL, or the synthetic demo task)",
        description="Answer every row of DATA.jsonl ({image | images | video, question, answer, type?, id?}; "
        "paths relative to the file) greedily and print the accuracy by normalised exact match (lowercase, "
        "punctuation and articles dropped, number words as digits), overall and per question type. A bad "
        "row (missing field, unreadable image) is reported and skipped. --synthetic N makes N held-out "
        "questions of the demo task instead.",
    )
    ev.add_argument("data", nargs="?", type=Path, help="JSONL file of rows (or use --synthetic)")
    ev.add_argument("--synthetic", type=int, metavar="N", help="N held-out questions of the synthetic task")
    ev.add_argument("--seed", type=int, default=0, help="seed of the synthetic questions")
    add_model_options(ev, BACKENDS, "the built-in demo model")
    ev.add_argument(
        "--precision",
        default="fp32",
        metavar="PRECISION",
        help=f"without --model: the demo model's export at this precision (one of {', '.join(export_precisions())}; "
        "all but fp32 on the onnx backend only), written once into the cache",
    )
    ev.add_argument("--max-new-tokens", type=int, default=32, help="longest answer generated")
    ev.add_argument("--out", type=Path, help="write the JSON report (per row and per type) here")
    ev.set_defaults(func=cmd_eval)

    o = command(
        "operators",
        help="print the table of ONNX operators each conversion target supports (docs/operators.md)",
        description="Print, as Markdown, the ONNX operators and opset versions each conversion target handles, "
        "generated from the converter registries.",
    )
    o.set_defaults(func=cmd_operators)

    b = command(
        "bench",
        help="measure speed and memory of every backend on a random-weight checkpoint",
        description="Build (or reuse) a random-weight checkpoint of the chosen size, export and convert it, and "
        "time every backend on the same inputs (one subprocess each): vision encode, prefill, time to first "
        "token, decode tokens/s against the memory-bandwidth roofline, compile time, peak memory. "
        "Writes table.md, results.json and chart.png.",
    )
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    sv = command(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, batching requests continuously",
        description="Serve POST /v1/chat/completions (text and images, streaming), GET /v1/models and GET /health. "
        "Requests share the model: they join a running batch of up to --max-batch at each decode step. With no "
        "--model, the built-in demo model (trained on pictures of coloured shapes) is served.",
    )
    add_model_options(sv, BACKENDS, "the built-in demo model")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: set --api-key too)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    sv.add_argument(
        "--served-model-name", help="the model id clients send (default: the model directory's name)"
    )
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429")
    sv.add_argument(
        "--max-seq-len",
        type=int,
        help=f"positions per slot, prompt + answer (default: an export's own, {DEFAULT_MAX_SEQ_LEN} for a checkpoint)",
    )
    sv.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $SLIMM_API_KEY, or open)"
    )
    sv.add_argument(
        "--max-body-bytes", type=int, default=20 * 2**20, help="largest request body (images included)"
    )
    sv.add_argument("--max-images", type=int, default=8, help="images per request")
    sv.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height of one image")
    sv.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (off: only inline data: URLs)",
    )
    sv.add_argument("--request-timeout", type=float, default=600.0, help="seconds for one answer")
    sv.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve: --replicas copies of the app, one engine each, requests spread across them",
    )
    sv.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the model")
    add_ray_address(sv)
    sv.add_argument(
        "--allowed-local-dir", help="read file:// image and video URLs inside this directory only"
    )
    sv.add_argument("--max-video-frames", type=int, default=32, help="frames of one video")
    sv.add_argument(
        "--visual-cache-mb", type=float, default=256, help="vision encodings kept by image content (0: off)"
    )
    sv.set_defaults(func=cmd_serve)

    bt = command(
        "batch",
        help="answer a prompt about every image of a folder or table, on Ray Data (one machine or many)",
        description="Answer every row of INPUT, a folder of images (recursive; id = the path inside it) or a "
        "JSONL / CSV / Parquet table with an image, images (a list; in CSV a JSON array) or video column and "
        "optionally prompt and id columns (paths relative to the table). Images are read and preprocessed in "
        "Ray tasks, a pool of --workers actors runs the model (loaded once each) on batches of --batch-size, "
        "greedily. OUT (.parquet, or .jsonl) gets id, source, prompt, answer, prompt_tokens, "
        "completion_tokens, seconds and error: each id once, a bad row with its error. Rows land in "
        "OUT.parts/ as they are answered; --resume finishes an interrupted run or adds new rows.",
    )
    bt.add_argument("input", type=Path, help="folder of images, or a .jsonl / .csv / .parquet table")
    bt.add_argument("--output", type=Path, required=True, help="file to write: .parquet or .jsonl")
    add_model_options(bt, BACKENDS, "the built-in demo model")
    bt.add_argument("--prompt", default="Describe this image.", help="for rows with no prompt of their own")
    bt.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens at most")
    add_ray_address(bt)
    bt.add_argument("--workers", type=int, default=1, help="model actors (each loads the model once)")
    bt.add_argument("--batch-size", type=int, default=8, help="rows answered together by one worker")
    bt.add_argument(
        "--resume", action="store_true", help="keep OUT's rows (and an interrupted run's) and answer the rest"
    )
    bt.set_defaults(func=cmd_batch)

    d = command(
        "demo-checkpoint",
        help="write a seeded random-weight checkpoint in the released format",
        description="Write a checkpoint directory in exactly the released SliMM format, with seeded random "
        "weights and the real Qwen tokenizer. 0.5b and 2b have the released architectures' sizes.",
    )
    d.add_argument("out", type=Path, help="directory to write")
    d.add_argument("--variant", default="plain", choices=list(VARIANTS), help="DeepStack variant")
    d.add_argument("--size", default="tiny", choices=list(SIZES), help="architecture size")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    d.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype on disk",
    )
    d.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty directory that is not a demo checkpoint"
    )
    d.set_defaults(func=cmd_demo_checkpoint)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # read by the frameworks' start-up (slimm.frameworks), so set before any is imported
        os.environ["SLIMM_VERBOSE"] = "1"
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
