"""`slimm serve` under load: 1, 2, 4, 8, 16 concurrent clients asking image + question through the
official `openai` client; aggregate tokens/s, time to first token and inter-token latency (p50 / p95),
the server's peak memory, and the second turn re-sending the same image (the visual cache).

The model is `slimm bench`'s random-weight checkpoint of --size, exported and quantized to --precision
by the same cached build (benchmarks.bench.Artefacts); the server runs `slimm serve` in its own process.
Writes results.json and table.md to --out; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import SIZES, Artefacts, default_work_dir, machine_line, model_path, thread_env
from benchmarks.measure import ONNX_EXPORTS
from slimm.errors import InputError
from slimm.export.quantize import BLOCK_SIZE, BLOCKED, check_block_size

QUESTION = "Describe this image in detail."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="0.5b", choices=SIZES, help="random-weight model size")
    p.add_argument("--variant", default="plain")
    p.add_argument(
        "--backend",
        default="onnx",
        help="slimm serve --backend; onnx-fused / onnx-fused-kv8 serve slimm bench's fused export on onnx",
    )
    p.add_argument(
        "--precision",
        default="int4",
        help="fp32 or an ONNX Runtime quantization (int4, int8, w8a8, int4+w8a8, int8+w8a8)",
    )
    p.add_argument(
        "--block-size", type=int, default=BLOCK_SIZE, help="MatMulNBits block size of a quantized build"
    )
    p.add_argument("--clients", default="1,2,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens per request (no early stop)")
    p.add_argument("--image-size", default="224x224", help="HEIGHTxWIDTH of each request's image")
    p.add_argument("--second-turn-image", default="448x448", help="image of the second-turn measurement")
    p.add_argument("--threads", type=int, default=2, help="the server's intra-op threads")
    p.add_argument("--max-batch", type=int, default=16, help="slimm serve --max-batch")
    p.add_argument("--max-seq-len", type=int, default=1024, help="slimm serve --max-seq-len (torch only)")
    p.add_argument("--work", type=Path, default=None, help="slimm bench's cache of built models")
    p.add_argument("--model", type=Path, help="serve this model directory instead of building one")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/serve-<cpu>")
    p.add_argument("--note", default="", help="a line about the conditions, written into the table")
    args = p.parse_args(argv)
    try:
        check_block_size(args.block_size)
    except InputError as e:
        p.error(str(e))
    args.clients = [int(x) for x in args.clients.split(",") if x.strip()]
    args.image_size = tuple(int(x) for x in args.image_size.lower().split("x"))
    args.second_turn_image = tuple(int(x) for x in args.second_turn_image.lower().split("x"))
    return args


def cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text().lower()
    except OSError:
        return platform.machine()
    for tag in ("epyc", "xeon", "ryzen", "core"):
        if tag in text:
            return tag
    return platform.machine()


def image_url(h: int, w: int, seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth blobs rather than noise: a PNG of realistic size, so the body is what a client sends
    small = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server, in its own process ---------------------------------------------------------------------
class Server:
    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "slimm",
            "serve",
            "--model",
            str(model),
            "--backend",
            "onnx" if args.backend in ONNX_EXPORTS else args.backend,
            "--port",
            str(self.port),
            "--max-batch",
            str(args.max_batch),
            "--max-queue",
            "256",
            "--served-model-name",
            "bench",
            "--request-timeout",
            "3600",  # a loaded machine is slow, not broken: measure it rather than time out
        ]
        if args.backend != "torch":
            cmd += ["--threads", str(args.threads)]
        if args.backend == "torch":  # an export's own maximum sequence length sizes its slots
            cmd += ["--max-seq-len", str(args.max_seq_len)]
        env = {**os.environ, **thread_env(args.threads)}
        self.log = open(Path(args.out) / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait()
        self._peak = 0
        self._sampling = False

    def _wait(self, timeout: float = 900.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server did not answer within {timeout:.0f} s")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def sample_peak(self):
        """A context: the server's peak RSS while it is open, sampled every 50 ms."""
        server = self

        class Sampler:
            def __enter__(self):
                server._peak, server._sampling = server.rss(), True
                self.t = threading.Thread(target=self.run, daemon=True)
                self.t.start()
                return self

            def run(self):
                while server._sampling:
                    server._peak = max(server._peak, server.rss())
                    time.sleep(0.05)

            def __exit__(self, *exc):
                server._sampling = False
                self.t.join()
                self.peak = server._peak

        return Sampler()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---- one request, timed per token -------------------------------------------------------------------------
def timed_request(client, messages: list[dict], max_tokens: int) -> dict[str, Any]:
    """Stream one answer; token arrival times from the logprobs entries (one per token)."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = client.chat.completions.create(
        model="bench",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                now = time.perf_counter()
                stamps += [now] * len(c.logprobs.content)
            text.append(c.delta.content or "")
    end = time.perf_counter()
    return {
        "start": t0,
        "end": end,
        "ttft": stamps[0] - t0 if stamps else float("nan"),
        "itl": list(np.diff(stamps)),
        "tokens": len(stamps),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "text": "".join(text),
    }


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run_level(client, n: int, args: argparse.Namespace, server: Server) -> dict[str, Any]:
    h, w = args.image_size

    def one_client(c: int) -> list[dict[str, Any]]:
        out = []
        for r in range(args.requests):
            # a new image every request: the visual cache must not make a level look faster
            url = image_url(h, w, seed=100_000 * n + 1000 * c + r)
            msgs = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ]
            out.append(timed_request(client, msgs, args.max_tokens))
        return out

    before = scrape(server.url)
    with server.sample_peak() as mem, ThreadPoolExecutor(n) as pool:
        t0 = time.perf_counter()
        results = [r for rs in pool.map(one_client, range(n)) for r in rs]
        wall = time.perf_counter() - t0
    after = scrape(server.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    decode_s = delta("slimm_decode_seconds_total")
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {
        "clients": n,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        # the decode steps' own rate: tokens they gave / time in them (no prefill, no vision encoder)
        "decode_tok_per_s": delta("slimm_decode_tokens_total") / decode_s if decode_s else float("nan"),
        "mean_decode_batch": delta("slimm_decode_tokens_total") / max(delta("slimm_decode_steps_total"), 1),
        "prefill_s": delta("slimm_prefill_seconds_total"),
        "decode_s": decode_s,
        "ttft_p50": pct(ttft, 50),
        "ttft_p95": pct(ttft, 95),
        "itl_p50": pct(itl, 50),
        "itl_p95": pct(itl, 95),
        "peak_rss_gb": mem.peak / 2**30,
        "prompt_tokens": results[0]["prompt_tokens"],
    }


def second_turn(client, args: argparse.Namespace, repeats: int = 3) -> dict[str, Any]:
    """TTFT of a first turn with a new image, then of the follow-up turn re-sending the whole chat (the
    image included), alone on the server; medians over `repeats` conversations."""
    h, w = args.second_turn_image
    first, second = [], []
    for k in range(repeats):
        url = image_url(h, w, seed=7_000_000 + k)
        turn = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ]
        a = timed_request(client, turn, 8)
        turn2 = [
            *turn,
            {"role": "assistant", "content": a["text"]},
            {"role": "user", "content": "And the colours?"},
        ]
        b = timed_request(client, turn2, 8)
        first.append(a["ttft"])
        second.append(b["ttft"])
    t1, t2 = statistics.median(first), statistics.median(second)
    return {"image": f"{h}x{w}", "first_ttft_s": t1, "second_ttft_s": t2, "ratio": t2 / t1}


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def table(res: dict[str, Any]) -> str:
    rows = res["levels"]
    base = rows[0]
    lines = [
        f"# slimm serve under load: {res['model']}",
        "",
        f"{res['machine']}",
        "",
        f"{res['note']}" if res["note"] else "",
        "",
        f"Each client sends {res['requests']} requests one after another: a new {res['image']} image + "
        f'"{QUESTION}", {res["max_tokens"]} answer tokens (greedy, streamed), {rows[0]["prompt_tokens"]} prompt tokens.',
        "",
        "| clients | requests | tokens/s | × 1 client | decode tok/s (mean batch) | × 1 client | prefill s "
        "| TTFT p50 s | TTFT p95 s | TTFT p95 × 1 client | ITL p50 ms | ITL p95 ms | peak RSS GB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['tok_per_s']:.1f} | {r['tok_per_s'] / base['tok_per_s']:.2f} "
            f"| {r['decode_tok_per_s']:.1f} ({r['mean_decode_batch']:.1f}) "
            f"| {r['decode_tok_per_s'] / base['decode_tok_per_s']:.2f} | {r['prefill_s']:.1f} "
            f"| {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['ttft_p95'] / base['ttft_p95']:.2f} "
            f"| {1000 * r['itl_p50']:.0f} | {1000 * r['itl_p95']:.0f} | {r['peak_rss_gb']:.2f} |"
        )
    s = res["second_turn"]
    lines += [
        "",
        f"Second turn re-sending the same {s['image']} image (visual cache): TTFT {s['second_ttft_s']:.2f} s "
        f"vs {s['first_ttft_s']:.2f} s for the first turn = **{s['ratio']:.2f}×** "
        f"(visual cache hits {res['visual_cache']['hits']:.0f}, misses {res['visual_cache']['misses']:.0f}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from openai import OpenAI

    args = parse_args(argv)
    args.out = args.out or Path(__file__).parent / "results" / f"serve-{cpu_tag()}"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        art = Artefacts(args.work or default_work_dir(), args.variant, args.size, args)
        model, why = model_path(art, args.backend, args.precision, 3600)
        if model is None:
            raise SystemExit(f"could not build the model: {why}")
        block = f", block {args.block_size}" if args.precision in BLOCKED else ""
        name = f"{args.size} {args.variant}, {args.backend} {args.precision}{block} (random weights)"
    else:
        model, name = args.model, f"{args.model.name}, {args.backend}"
    print(f"serving {model}", file=sys.stderr)
    server = Server(model, args)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=3600, max_retries=0)
        timed_request(client, [{"role": "user", "content": "warm up"}], 4)  # first-call costs out of the way
        levels = []
        for n in args.clients:
            r = run_level(client, n, args, server)
            levels.append(r)
            print(
                f"{n:>3} clients: {r['tok_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50']:.2f} s p95 "
                f"{r['ttft_p95']:.2f} s  ITL p50 {1000 * r['itl_p50']:.0f} ms p95 {1000 * r['itl_p95']:.0f} ms  "
                f"peak {r['peak_rss_gb']:.2f} GB",
                file=sys.stderr,
                flush=True,
            )
        turn = second_turn(client, args)
        metrics = scrape(server.url)
    finally:
        server.stop()
    res = {
        "model": name,
        "machine": machine_line(args.threads),
        "note": args.note,
        "requests": args.requests,
        "image": f"{args.image_size[0]}x{args.image_size[1]}",
        "max_tokens": args.max_tokens,
        "levels": levels,
        "second_turn": turn,
        "visual_cache": {
            "hits": metrics.get("slimm_visual_cache_hits_total", 0),
            "misses": metrics.get("slimm_visual_cache_misses_total", 0),
        },
        "argv": sys.argv[1:] if argv is None else argv,
    }
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    text = table(res)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
