"""The engine's counters and latency histograms, and their Prometheus text exposition (GET /metrics)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

# seconds: fine steps where a tiny model answers on CPU, coarse up to a long image prefill
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        total += self.counts[-1]
        return [
            *out,
            f'{name}_bucket{{le="+Inf"}} {total}',
            f"{name}_sum {self.sum}",
            f"{name}_count {total}",
        ]


class Metrics:
    """Written by the engine thread, read by the app: one lock around both."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: Counter[str] = Counter()  # by finish reason, "error" for failures
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.decode_steps = 0  # batched decode steps run
        self.decode_tokens = 0  # tokens those steps gave (a step gives one per running request)
        self.decode_seconds = 0.0  # time inside them: decode tokens / decode seconds is the decode rate
        self.prefill_seconds = 0.0  # time in prompts' prefill (vision encoder included)
        self.ttft = Histogram()  # submission -> first token
        self.itl = Histogram()  # between two tokens of one request

    def render(self, waiting: int, running: int, max_batch: int, visual: dict[str, int] | None = None) -> str:
        with self.lock:
            lines = [
                "# HELP slimm_requests_total Requests finished, by finish reason.",
                "# TYPE slimm_requests_total counter",
                *(f'slimm_requests_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())),
                "# HELP slimm_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE slimm_prompt_tokens_total counter",
                f"slimm_prompt_tokens_total {self.prompt_tokens}",
                "# HELP slimm_generation_tokens_total Tokens generated.",
                "# TYPE slimm_generation_tokens_total counter",
                f"slimm_generation_tokens_total {self.generation_tokens}",
                "# HELP slimm_decode_steps_total Batched decode steps.",
                "# TYPE slimm_decode_steps_total counter",
                f"slimm_decode_steps_total {self.decode_steps}",
                "# HELP slimm_decode_tokens_total Tokens the decode steps gave.",
                "# TYPE slimm_decode_tokens_total counter",
                f"slimm_decode_tokens_total {self.decode_tokens}",
                "# HELP slimm_decode_seconds_total Time in decode steps.",
                "# TYPE slimm_decode_seconds_total counter",
                f"slimm_decode_seconds_total {self.decode_seconds}",
                "# HELP slimm_prefill_seconds_total Time in prefill (vision encoder included).",
                "# TYPE slimm_prefill_seconds_total counter",
                f"slimm_prefill_seconds_total {self.prefill_seconds}",
                "# HELP slimm_queue_depth Requests waiting for a slot.",
                "# TYPE slimm_queue_depth gauge",
                f"slimm_queue_depth {waiting}",
                "# HELP slimm_running_batch Requests in the running batch.",
                "# TYPE slimm_running_batch gauge",
                f"slimm_running_batch {running}",
                "# HELP slimm_max_batch Slots of the KV pool.",
                "# TYPE slimm_max_batch gauge",
                f"slimm_max_batch {max_batch}",
                "# HELP slimm_time_to_first_token_seconds From submission to the first token.",
                "# TYPE slimm_time_to_first_token_seconds histogram",
                *self.ttft.lines("slimm_time_to_first_token_seconds"),
                "# HELP slimm_inter_token_latency_seconds Between two tokens of one request.",
                "# TYPE slimm_inter_token_latency_seconds histogram",
                *self.itl.lines("slimm_inter_token_latency_seconds"),
            ]
        if visual is not None:
            lines += [
                "# HELP slimm_visual_cache_hits_total Images whose encoding came from the visual cache.",
                "# TYPE slimm_visual_cache_hits_total counter",
                f"slimm_visual_cache_hits_total {visual['hits']}",
                "# HELP slimm_visual_cache_misses_total Images run through the vision encoder.",
                "# TYPE slimm_visual_cache_misses_total counter",
                f"slimm_visual_cache_misses_total {visual['misses']}",
                "# HELP slimm_visual_cache_bytes Bytes of encodings the visual cache holds.",
                "# TYPE slimm_visual_cache_bytes gauge",
                f"slimm_visual_cache_bytes {visual['bytes']}",
            ]
        return "\n".join(lines) + "\n"
