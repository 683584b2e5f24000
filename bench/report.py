"""Per-run metrics, medians over repeats, ratios against A, goals, and the printed table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

LABELS = {
    "A": "A in-process AsyncLLM",
    "B": "B worker (gRPC)",
    "Bp": "B worker +parsers",
    "Bg": "B worker, Go client",
    "B'": "B' worker, --worker-tree",
    "B:nowrite": "B, framed, not written",
    "B:discard": "B, sends dropped",
    "B:nosend": "B, no streamed Replies",
    "Bi": "Bi worker on grpcio",
    "G": "G vLLM gRPC server",
    "C": "C vLLM OpenAI server",
}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def _median(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return float(statistics.median(xs)) if xs else None


def drift(requests: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Inter-chunk gap over the last 20 % of each stream vs its first 20 %.

    Positions are chunk positions (chunks ≈ tokens when the reader keeps up,
    which it does at concurrency 1). The first gap after TTFT is included in
    the first 20 %; pooled over the workload's requests.
    """
    first: list[float] = []
    last: list[float] = []
    for r in requests:
        gaps = r["gaps_ms"]
        k = max(1, len(gaps) // 5)
        if len(gaps) >= 10:
            first += gaps[:k]
            last += gaps[-k:]
    if not first:
        return {"first_p50_ms": None, "last_p50_ms": None, "ratio_p50": None, "ratio_mean": None}
    f50, l50 = statistics.median(first), statistics.median(last)
    fm, lm = statistics.fmean(first), statistics.fmean(last)
    return {
        "first_p50_ms": f50,
        "last_p50_ms": l50,
        "first_mean_ms": fm,
        "last_mean_ms": lm,
        "ratio_p50": l50 / f50 if f50 else None,
        "ratio_mean": lm / fm if fm else None,
    }


def run_metrics(raw: dict[str, Any]) -> dict[str, Any]:
    """Metrics of one (target, workload, repeat) from a driver/client's raw result."""
    reqs = raw["requests"]
    ok = [r for r in reqs if not r["error"]]
    tokens = sum(r["tokens"] for r in ok)
    chunks = sum(r["chunks"] for r in ok)
    ttfts = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    gaps = [g for r in ok for g in r["gaps_ms"]]
    wall = raw["wall_s"]

    def per_tok(cpu: float | None) -> float | None:
        return cpu / tokens * 1e6 if tokens and cpu is not None else None

    m = {
        "requests": len(reqs),
        "errors": len(reqs) - len(ok),
        "first_error": next((r["error"] for r in reqs if r["error"]), ""),
        "tokens": tokens,
        "tokens_per_request": tokens / len(ok) if ok else 0,
        "chunks_per_token": chunks / tokens if tokens else None,
        "wall_s": wall,
        "tok_s": tokens / wall if wall else None,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p95_ms": percentile(ttfts, 95),
        # B only: the worker's own TTFT (PredictStream entry → first engine output),
        # so client TTFT - this = gRPC transport + client + the worker's prepare().
        "server_ttft_p50_ms": percentile(
            [r["server_ttft_ms"] for r in ok if r.get("server_ttft_ms") is not None], 50
        ),
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p99_ms": percentile(gaps, 99),
        "itl_max_ms": max(gaps) if gaps else None,
        "tree_cpu_s": raw.get("tree_cpu_s"),
        "main_cpu_s": raw.get("main_cpu_s"),
        "client_cpu_s": raw.get("client_cpu_s"),
        "tree_cpu_us_per_tok": per_tok(raw.get("tree_cpu_s")),
        "main_cpu_us_per_tok": per_tok(raw.get("main_cpu_s")),
        "main_cpu_us_per_req": raw["main_cpu_s"] / len(ok) * 1e6
        if ok and raw.get("main_cpu_s") is not None
        else None,
        "client_cpu_us_per_tok": per_tok(raw.get("client_cpu_s")),
        "loadavg_1m": raw.get("loadavg_1m"),
    }
    m.update({f"drift_{k}": v for k, v in drift(ok).items()})
    threads = raw.get("main_threads_cpu_s")
    if threads and tokens:
        m["main_threads_us_per_tok"] = {k: v / tokens * 1e6 for k, v in threads.items()}
    gc = raw.get("gc")
    if gc:
        m["gc_collections"] = gc["collections"]
        m["gc_pause_ms"] = sum(gc["pause_ms"])
        m["gc_full_pauses_ms"] = gc["full_pauses_ms"]
        m["gc_full_count"] = len(gc["full_pauses_ms"])
        m["gc_full_max_ms"] = max(gc["full_pauses_ms"], default=0.0)
    return m


SUMMARY_KEYS = (
    "tok_s",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "server_ttft_p50_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "itl_max_ms",
    "gc_pause_ms",
    "gc_full_count",
    "gc_full_max_ms",
    "tree_cpu_s",
    "main_cpu_s",
    "client_cpu_s",
    "tree_cpu_us_per_tok",
    "main_cpu_us_per_tok",
    "main_cpu_us_per_req",
    "client_cpu_us_per_tok",
    "chunks_per_token",
    "tokens_per_request",
    "drift_ratio_p50",
    "drift_ratio_mean",
    "drift_first_p50_ms",
    "drift_last_p50_ms",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{workload: {target: {metric: median over repeats, "repeats": n, "errors": n}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run["workload"], {}).setdefault(run["target"], {"_runs": []})
        out[run["workload"]][run["target"]]["_runs"].append(run["metrics"])
    for per_target in out.values():
        for target, entry in per_target.items():
            ms = entry.pop("_runs")
            summary: dict[str, Any] = {k: _median(m.get(k) for m in ms) for k in SUMMARY_KEYS}
            names = {n for m in ms for n in m.get("main_threads_us_per_tok", {})}
            if names:
                per_thread = {
                    n: _median(m.get("main_threads_us_per_tok", {}).get(n, 0.0) for m in ms)
                    for n in names
                }
                summary["main_threads_us_per_tok"] = dict(
                    sorted(per_thread.items(), key=lambda kv: -(kv[1] or 0.0))
                )
            summary["repeats"] = len(ms)
            summary["errors"] = sum(m["errors"] for m in ms)
            per_target[target] = summary
    return out


def _workloads(runs: list[dict[str, Any]]) -> list[str]:
    """The workloads in the order they first ran."""
    return list(dict.fromkeys(r["workload"] for r in runs))


def paired_values(
    runs: list[dict[str, Any]], workload: str, target: str, base: str, key: str, how: str
) -> list[float]:
    """Per repeat, in repeat order: target/base ("ratio") or target-base ("diff") for `key`."""
    by = {(r["target"], r["repeat"]): r["metrics"] for r in runs if r["workload"] == workload}
    vals = []
    for (t, rep), m in sorted(by.items(), key=lambda kv: kv[0][1]):
        if t != target or (base, rep) not in by:
            continue
        a, b = m.get(key), by[(base, rep)].get(key)
        if a is None or b is None:
            continue
        if how == "ratio":
            if b:
                vals.append(a / b)
        else:
            vals.append(a - b)
    return vals


def spread(runs: list[dict[str, Any]], target: str = "A", key: str = "tok_s") -> dict[str, Any]:
    """{workload: (min, max) of `key` over the repeats of one target}: how much the
    machine itself moves within a run (A is the same code every repeat)."""
    out: dict[str, Any] = {}
    for w in _workloads(runs):
        xs = [
            r["metrics"][key]
            for r in runs
            if r["workload"] == w and r["target"] == target and r["metrics"].get(key) is not None
        ]
        if len(xs) >= 2:
            out[w] = (min(xs), max(xs))
    return out


_PAIRED = {
    "tok_s_ratio": ("tok_s", "ratio"),
    "ttft_p50_overhead_ms": ("ttft_p50_ms", "diff"),
    "ttft_p95_overhead_ms": ("ttft_p95_ms", "diff"),
    "itl_p50_ratio": ("itl_p50_ms", "ratio"),
    "tree_cpu_ratio": ("tree_cpu_s", "ratio"),
    "main_cpu_per_tok_ratio": ("main_cpu_us_per_tok", "ratio"),
}


def comparisons(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{workload: {"B/A": {...}, "C/A": {...}, "Bp/B": {...}}} paired per repeat."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    pairs = [
        ("B", "A"),
        ("B'", "A"),
        ("B'", "B"),
        ("B:nowrite", "A"),
        ("B:discard", "A"),
        ("B:nosend", "A"),
        ("Bi", "A"),
        ("G", "A"),
        ("Bg", "A"),
        ("C", "A"),
        ("Bp", "B"),
    ]
    targets = {(r["workload"], r["target"]) for r in runs}
    for w in _workloads(runs):
        for t, base in pairs:
            if (w, t) not in targets or (w, base) not in targets:
                continue
            per_repeat = {
                name: paired_values(runs, w, t, base, key, how)
                for name, (key, how) in _PAIRED.items()
            }
            out.setdefault(w, {})[f"{t}/{base}"] = {
                **{name: _median(vals) for name, vals in per_repeat.items()},
                "per_repeat": per_repeat,
            }
    return out


TTFT_LIMITS_MS = {"c1": 1.0, "c8": 3.0, "c32": 8.0}


def goals(
    comps: dict[str, Any],
    summary: dict[str, Any],
    loads: dict[str, Any],
    floor: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The goals from the brief, for B (and C) against A: value, limit, PASS/FAIL.

    `floor` (bench/floor.py: the workers' gRPC server alone, no engine) annotates the TTFT and
    CPU rows with what the transport itself costs on this machine."""
    rows: list[dict[str, Any]] = []

    def add(
        name: str,
        value: float | None,
        limit: float,
        higher_is_better: bool,
        note: str = "",
        per_repeat: Sequence[float] = (),
    ):
        def passes(v: float) -> bool:
            return v >= limit if higher_is_better else v <= limit

        verdict = "n/a" if value is None else "PASS" if passes(value) else "FAIL"
        rows.append(
            {
                "goal": name,
                "value": value,
                "limit": limit,
                "better": ">=" if higher_is_better else "<=",
                "verdict": verdict,
                # How many paired repeats pass on their own: a verdict is
                # settled by the data only at n/n or 0/n.
                "repeats_passing": [sum(passes(v) for v in per_repeat), len(per_repeat)]
                if per_repeat
                else None,
                "note": note,
            }
        )

    for t in ("B", "Bi", "G", "Bg", "C"):
        key = f"{t}/A"
        for w in ("c1", "c8", "c32"):
            c = comps.get(w, {}).get(key)
            if c:
                add(
                    f"{t} throughput/A {w}",
                    c["tok_s_ratio"],
                    0.95,
                    True,
                    per_repeat=c["per_repeat"]["tok_s_ratio"],
                )
        for w in ("c1", "c8", "c32"):
            c = comps.get(w, {}).get(key)
            if c:
                add(
                    f"{t} TTFT p50 overhead {w} (ms)",
                    c["ttft_p50_overhead_ms"],
                    TTFT_LIMITS_MS[w],
                    False,
                    f"{floor['transport']} floor {floor['ttft_ms']:.2f} ms (Python client)"
                    if floor and t == "B"
                    else "",
                    per_repeat=c["per_repeat"]["ttft_p50_overhead_ms"],
                )
        long = summary.get("long", {})
        if t in long:
            own = long[t].get("drift_ratio_p50")
            base = long.get("A", {}).get("drift_ratio_p50")
            add(
                f"{t} 1000-tok ITL last20%/first20%",
                own,
                1.02,
                False,
                f"A alone: {base:.3f}" if base else "",
            )
            if own and base:
                add(f"{t} ITL drift relative to A", own / base, 1.02, False)
        c1 = comps.get("c1", {}).get(key)
        if c1:
            add(
                f"{t} front-end CPU/token c1 vs A",
                c1["main_cpu_per_tok_ratio"],
                1.2,
                False,
                "serving process main pid vs A's driver process"
                + (
                    f"; {floor['transport']} floor {floor['server_cpu_us_per_msg']:.0f} µs/message"
                    if floor and t == "B"
                    else ""
                ),
                per_repeat=c1["per_repeat"]["main_cpu_per_tok_ratio"],
            )
    chat = comps.get("chat8", {}).get("Bp/B")
    if chat:
        add(
            "parsers-on/off throughput chat8",
            chat["tok_s_ratio"],
            0.90,
            True,
            per_repeat=chat["per_repeat"]["tok_s_ratio"],
        )
    if loads.get("A") and loads.get("B"):
        add(
            "LoadModel / AsyncLLM construction",
            loads["B"] / loads["A"],
            1.05,
            False,
            f"{loads['B']:.2f}s vs {loads['A']:.2f}s (one sample each)",
        )
    return rows


# ---- printing ---------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(summary: dict[str, Any], comps: dict[str, Any], goal_rows: list[dict[str, Any]]) -> str:
    lines = []
    head = (
        f"{'workload':8} {'target':22} {'tok/s':>8} {'TTFT50':>7} {'TTFT95':>7} "
        f"{'ITL50':>6} {'ITL99':>6} {'treeCPU':>7} {'fe us/t':>7} {'cl us/t':>7} "
        f"{'ch/tok':>6} {'thr/A':>6} {'+TTFT':>6}"
    )
    lines += [head, "-" * len(head)]
    for w, per_target in summary.items():
        for t in ("A", "B", "B'", "B:nowrite", "B:discard", "B:nosend", "Bi", "G", "Bg", "Bp", "C"):
            s = per_target.get(t)
            if s is None:
                continue
            base = "B" if t == "Bp" else "A"
            c = comps.get(w, {}).get(f"{t}/{base}", {})
            err = f"  ({s['errors']} errors)" if s["errors"] else ""
            lines.append(
                f"{w:8} {LABELS[t]:22} {_f(s['tok_s']):>8} {_f(s['ttft_p50_ms']):>7} "
                f"{_f(s['ttft_p95_ms']):>7} {_f(s['itl_p50_ms'], '{:.2f}'):>6} "
                f"{_f(s['itl_p99_ms'], '{:.2f}'):>6} {_f(s['tree_cpu_s'], '{:.2f}'):>7} "
                f"{_f(s['main_cpu_us_per_tok'], '{:.0f}'):>7} "
                f"{_f(s['client_cpu_us_per_tok'], '{:.0f}'):>7} "
                f"{_f(s['chunks_per_token'], '{:.2f}'):>6} "
                f"{_f(c.get('tok_s_ratio'), '{:.3f}'):>6} "
                f"{_f(c.get('ttft_p50_overhead_ms'), '{:+.1f}'):>6}{err}"
            )
            if w == "c1" and s.get("main_threads_us_per_tok"):
                top = list(s["main_threads_us_per_tok"].items())[:5]
                lines.append(
                    f"{'':8} {'':22} front-end CPU µs/token by thread: "
                    + ", ".join(f"{n} {v:.0f}" for n, v in top)
                )
            if s.get("server_ttft_p50_ms") is not None:
                lines.append(
                    f"{'':8} {'':22} worker-internal TTFT p50 {s['server_ttft_p50_ms']:.1f} ms "
                    "(generate() → first output; the rest of TTFT is prepare + gRPC + client)"
                )
            if s.get("gc_pause_ms") is not None:
                lines.append(
                    f"{'':8} {'':22} GC: {s['gc_pause_ms']:.1f} ms paused per run, "
                    f"{s['gc_full_count']:.0f} full collections (longest "
                    f"{s['gc_full_max_ms']:.1f} ms); ITL max {_f(s['itl_max_ms'])} ms"
                )
            if w == "long" and s.get("drift_ratio_p50") is not None:
                lines.append(
                    f"{'':8} {'':22} ITL first20% p50 {s['drift_first_p50_ms']:.3f} ms, "
                    f"last20% p50 {s['drift_last_p50_ms']:.3f} ms, ratio "
                    f"{s['drift_ratio_p50']:.3f} (mean-based {_f(s['drift_ratio_mean'], '{:.3f}')})"
                )
    lines.append(
        "(TTFT/ITL in ms, medians over repeats; treeCPU = serving process tree CPU s; "
        "fe us/t = serving main process CPU µs per output token; cl us/t = client process; "
        "thr/A = throughput ratio vs A (Bp: vs B); +TTFT = TTFT p50 overhead ms)"
    )
    lines.append("")
    lines.append(f"{'goal':42} {'value':>8} {'limit':>8}  verdict repeats")
    for g in goal_rows:
        rp = g.get("repeats_passing")
        tally = f"{rp[0]}/{rp[1]}" if rp else "-"
        lines.append(
            f"{g['goal']:42} {_f(g['value'], '{:.3f}'):>8} {g['better']}{g['limit']:<7g}  "
            f"{g['verdict']:7} {tally:>7}{'  ' + g['note'] if g['note'] else ''}"
        )
    lines.append(
        "(value: median of the per-repeat paired values; repeats: how many repeats pass on "
        "their own; only n/n or 0/n is a verdict the data settle)"
    )
    return "\n".join(lines)


def noise_line(a_spread: dict[str, Any]) -> str:
    """A's own throughput range over the repeats (`spread(runs)`): the machine's
    swing within this run."""
    parts = [
        f"{w} {lo:.0f}-{hi:.0f} tok/s (max/min {hi / lo:.2f})"
        for w, (lo, hi) in a_spread.items()
        if lo
    ]
    return "A's own throughput across repeats (same code each time): " + (
        ", ".join(parts) if parts else "n/a"
    )


def side_by_side(comps: dict[str, Any]) -> str:
    """Serving-process CPU per output token and throughput, each target as a
    multiple of A's (paired per repeat): median [min-max] over the repeats."""

    def cell(values: Sequence[float]) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    lines = [
        f"{'workload':8} {'target':26} {'CPU/token x base':>22} {'tok/s x base':>22}",
    ]
    for w, per_pair in comps.items():
        for pair, c in per_pair.items():
            t, base = pair.split("/")
            if base != "A" and pair != "B'/B":
                continue
            label = LABELS.get(t, t) + ("" if base == "A" else " /B")
            lines.append(
                f"{w:8} {label:26} {cell(c['per_repeat']['main_cpu_per_tok_ratio']):>22} "
                f"{cell(c['per_repeat']['tok_s_ratio']):>22}"
            )
    lines.append(
        "(serving main process CPU per output token / the base's (A's driver; /B: worker B), "
        "and tok/s / the base's, paired per repeat: median [min-max])"
    )
    return "\n".join(lines)
