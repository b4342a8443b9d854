"""Run results, their statistics, and the tables and JSON they are printed as."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class RunResult:
    """One timed run of one workload on one system."""

    system: str
    workload: str
    elapsed_s: float
    num_output_tokens: int
    #: Seconds from submission to each request's first output token.
    ttft_s: list[float] = field(default_factory=list)
    #: Seconds between consecutive output tokens of a request (all requests pooled).
    itl_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s

    @property
    def request_s(self) -> float:
        return self.extra.get("num_requests", 0) / self.elapsed_s


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


@dataclass
class Summary:
    """The median over repetitions of one (system, workload) pair."""

    system: str
    workload: str
    repeats: int
    elapsed_s: float
    output_tok_s: float
    request_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    decode_tok_s: float | None
    runs_output_tok_s: list[float]
    extra: dict

    @classmethod
    def of(cls, runs: list[RunResult]) -> Summary:
        first = runs[0]
        med = statistics.median
        ms = lambda v: None if v is None else v * 1000  # noqa: E731
        ttft = [percentile(r.ttft_s, 50) for r in runs if r.ttft_s]
        ttft99 = [percentile(r.ttft_s, 99) for r in runs if r.ttft_s]
        itl = [percentile(r.itl_s, 50) for r in runs if r.itl_s]
        itl99 = [percentile(r.itl_s, 99) for r in runs if r.itl_s]
        decode = [1 / statistics.fmean(r.itl_s) for r in runs if r.itl_s]
        return cls(
            first.system, first.workload, len(runs), med(r.elapsed_s for r in runs), med(r.output_tok_s for r in runs),
            med(r.request_s for r in runs), ms(med(ttft)) if ttft else None, ms(med(ttft99)) if ttft99 else None,
            ms(med(itl)) if itl else None, ms(med(itl99)) if itl99 else None, med(decode) if decode else None,
            [round(r.output_tok_s, 2) for r in runs], first.extra,
        )


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(summaries: list[Summary], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    header = f"{'workload':8s} {'system':44s} {'out tok/s':>10s} {'req/s':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s} {'decode tok/s':>12s}"
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(f"{s.workload:8s} {s.system:44s} {s.output_tok_s:10.1f} {s.request_s:7.2f} {_fmt(s.ttft_p50_ms, '8.0f')}m "
              f"{_fmt(s.ttft_p99_ms, '8.0f')}m {_fmt(s.itl_p50_ms, '7.1f')}m {_fmt(s.itl_p99_ms, '7.1f')}m {_fmt(s.decode_tok_s, '12.1f')}")
    print("(TTFT / ITL in milliseconds; figures are medians over repetitions)")


def write_json(path: str, payload: dict) -> None:
    def convert(obj):
        if isinstance(obj, Summary):
            return asdict(obj)
        raise TypeError(type(obj))

    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=convert)
