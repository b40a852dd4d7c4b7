"""SLO benchmark: how far a p99 read from a DDSketch, and one read from classic Prometheus
histogram buckets, land from the exact p99 of realistic TTFT samples.

Each scenario is a lognormal mixture (a fast mode and a slow, queued or cold-start tail),
drawn with several seeds. The sketch path is the production one: eight workers each fill
a sketch, ship its bytes, and the merged sketch answers. The bucket path counts the same
samples into vLLM's `time_to_first_token_seconds` buckets and applies PromQL's
`histogram_quantile` (linear interpolation inside the bucket). Figures are the worst
relative error over every scenario and seed (and the mean).

    .venv/bin/python -m tests.bench.slo --json
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from dataplane.sketch import LatencySketch
from tests.bench.common import percentile, report

# vllm/v1/metrics/loggers.py, vllm:time_to_first_token_seconds
VLLM_TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
WORKERS = 8


@dataclass(frozen=True)
class Mode:
    share: float
    median_s: float
    sigma: float


SCENARIOS: dict[str, list[Mode]] = {
    "chat": [Mode(0.95, 0.15, 0.5), Mode(0.05, 1.2, 0.6)],
    "long_prompts": [Mode(1.0, 0.6, 0.8)],
    "cold_start_tail": [Mode(0.99, 0.08, 0.3), Mode(0.01, 8.0, 0.5)],
    "saturated": [Mode(0.7, 0.3, 0.4), Mode(0.3, 3.0, 0.7)],
}


def draw(modes: list[Mode], n: int, rng: np.random.Generator) -> np.ndarray:
    counts = rng.multinomial(n, [m.share for m in modes])
    parts = [
        rng.lognormal(math.log(m.median_s), m.sigma, count)
        for m, count in zip(modes, counts, strict=True)
    ]
    samples = np.concatenate(parts)
    rng.shuffle(samples)
    return samples


def sketch_quantile(samples: np.ndarray, q: float) -> float:
    """Fill one sketch per worker, ship bytes, merge: what the control plane reads."""
    merged = LatencySketch()
    for part in np.array_split(samples, WORKERS):
        worker = LatencySketch()
        for value in part.tolist():
            worker.add(value)
        merged.merge(LatencySketch.from_bytes(worker.to_bytes()))
    value = merged.quantile(q)
    assert value is not None, "the merged sketch is empty"
    return value


def histogram_quantile(samples: np.ndarray, q: float, bounds: list[float]) -> float:
    """PromQL histogram_quantile over cumulative `le` buckets (+Inf last)."""
    counts = [0] * (len(bounds) + 1)
    for value in samples.tolist():
        counts[bisect.bisect_left(bounds, value)] += 1
    rank = q * len(samples)
    cumulative = 0
    for index, count in enumerate(counts):
        if cumulative + count >= rank:
            if index == len(bounds):  # the +Inf bucket: Prometheus answers the last bound
                return bounds[-1]
            lower = 0.0 if index == 0 else bounds[index - 1]
            upper = bounds[index]
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return bounds[-1]


def percentile_error(args: argparse.Namespace, progress: tqdm) -> dict[str, Any]:
    sketch_errors: list[float] = []
    bucket_errors: list[float] = []
    for name, modes in SCENARIOS.items():
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            samples = draw(modes, args.samples, rng)
            exact = percentile(samples.tolist(), 99)
            sketch_errors.append(abs(sketch_quantile(samples, 0.99) - exact) / exact)
            bucket_errors.append(
                abs(histogram_quantile(samples, 0.99, VLLM_TTFT_BUCKETS) - exact) / exact
            )
            progress.set_postfix_str(f"{name} seed {seed}")
            progress.update()
    return {
        "p99_rel_err_sketch": max(sketch_errors),
        "p99_rel_err_prom_buckets": max(bucket_errors),
        "p99_rel_err_sketch_mean": float(np.mean(sketch_errors)),
        "p99_rel_err_prom_buckets_mean": float(np.mean(bucket_errors)),
        "scenarios": len(SCENARIOS),
        "seeds": args.seeds,
        "samples_per_run": args.samples,
    }


Measurement = Callable[[argparse.Namespace, tqdm], dict[str, Any]]
MEASUREMENTS: dict[str, tuple[Measurement, Callable[[argparse.Namespace], int]]] = {
    # name: (run, progress steps)
    "percentile_error": (percentile_error, lambda args: len(SCENARIOS) * args.seeds),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tailguard bench slo", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=100_000, help="samples per run")
    parser.add_argument("--seeds", type=int, default=5, help="runs per scenario")
    parser.add_argument(
        "--only", choices=sorted(MEASUREMENTS), action="append", help="run just these"
    )
    args = parser.parse_args(argv)
    chosen = args.only or list(MEASUREMENTS)
    results: dict[str, Any] = {}
    steps = sum(MEASUREMENTS[name][1](args) for name in chosen)
    with tqdm(total=steps, file=sys.stderr, unit="run") as progress:
        for name in chosen:
            results.update(MEASUREMENTS[name][0](args, progress))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, as_json=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
