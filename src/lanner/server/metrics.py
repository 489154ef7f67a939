"""Prometheus metrics in the text exposition format, written by hand (no extra
dependency): request counts by endpoint and status, tokens, queue depth, active
streams, loaded models and a time-to-first-token histogram.

Counters are updated from the event loop and from worker threads, so every
update holds one lock; rendering copies under the same lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative-bucket histogram, as Prometheus defines it."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum}", f"{name}_count{suffix} {total}"]
        return out


class Metrics:
    """The server's counters; ``gauges`` are read live when rendering."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.ttft: dict[str, Histogram] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.collectors: list[Callable[[], list[str]]] = []

    def count_request(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests[(method, path, status)] += 1

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens[model] += prompt
            self.completion_tokens[model] += completion

    def observe_ttft(self, model: str, seconds: float) -> None:
        with self._lock:
            hist = self.ttft.setdefault(model, Histogram(TTFT_BUCKETS))
            hist.observe(seconds)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time (queue depth, loaded models...)."""
        self.gauges[name] = (help_text, read)

    def collector(self, lines: Callable[[], list[str]]) -> None:
        """Register a function that writes its own exposition lines at scrape time."""
        self.collectors.append(lines)

    def render(self) -> str:
        """The whole exposition text."""
        with self._lock:
            out = _counter("lanner_requests_total", "HTTP requests by endpoint and status",
                           {f'method="{m}",path="{esc(p)}",status="{s}"': v
                            for (m, p, s), v in sorted(self.requests.items())})
            out += _counter("lanner_prompt_tokens_total", "prompt tokens processed",
                            {f'model="{esc(k)}"': v for k, v in sorted(self.prompt_tokens.items())})
            out += _counter("lanner_completion_tokens_total", "tokens generated",
                            {f'model="{esc(k)}"': v
                             for k, v in sorted(self.completion_tokens.items())})
            name = "lanner_time_to_first_token_seconds"
            out += [f"# HELP {name} seconds from admission to the first generated text",
                    f"# TYPE {name} histogram"]
            for model, hist in sorted(self.ttft.items()):
                out += hist.lines(name, f'model="{esc(model)}"')
        for gname, (help_text, read) in sorted(self.gauges.items()):
            out += [f"# HELP {gname} {help_text}", f"# TYPE {gname} gauge", f"{gname} {read()}"]
        for collect in self.collectors:
            out += collect()
        return "\n".join(out) + "\n"


def _counter(name: str, help_text: str, values: dict[str, int]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    return lines + [f"{name}{{{labels}}} {value}" for labels, value in values.items()]


def esc(value: str) -> str:
    """A label value, escaped as the exposition format wants."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
