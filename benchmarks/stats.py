"""Percentiles and the printed table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linearly interpolated; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p95/p99/max in milliseconds, rounded to 0.1 ms."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "count": len(seconds),
        "p50_ms": ms(percentile(seconds, 50)),
        "p95_ms": ms(percentile(seconds, 95)),
        "p99_ms": ms(percentile(seconds, 99)),
        "max_ms": ms(max(seconds) if seconds else None),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(fraction: Any) -> str | None:
    return None if fraction is None else f"{100 * float(fraction):.0f}%"


def _rows(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(texts: Sequence[str]) -> str:
        # First column (the label) left-aligned, figures right-aligned.
        pairs = enumerate(zip(texts, widths, strict=True))
        return "  ".join(t.rjust(w) if i else t.ljust(w) for i, (t, w) in pairs)

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]


def table(report: Mapping[str, Any]) -> str:
    """The human summary of a results document."""
    meta = report.get("meta", {})
    lines = [
        f"Tether benchmarks  {meta.get('date', '')}  commit {meta.get('commit', '?')}  "
        f"{meta.get('cpus', '?')} CPUs  operator workers/kind {meta.get('workers', '?')}",
        "",
        "Convergence: N ConsulServices + N EtcdConfigs (5 keys) created at once",
    ]
    rows = []
    for n, size in sorted(report.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        op = size.get("operator", {})
        fl = size.get("floor", {})
        pf = size.get("protocol_floor", {})
        lat = op.get("latency", {})
        per = op.get("writes_per_resource", {})
        rows.append([
            n, op.get("seconds"), fl.get("seconds"), size.get("ratio_to_floor"),
            pf.get("seconds"), size.get("ratio_to_protocol_floor"),
            op.get("create_seconds"), lat.get("p50_ms"), lat.get("p95_ms"), lat.get("p99_ms"),
            fl.get("latency", {}).get("p50_ms"),
            per.get("consul"), per.get("etcd"), per.get("kubernetes"),
            op.get("operator_cpu_seconds"), _pct(op.get("machine_busy")), _pct(fl.get("machine_busy")),
            op.get("not_ready"),
        ])
    lines += _rows(
        ["N", "operator s", "floor s", "ratio", "proto floor s", "ratio proto", "create s",
         "p50 ms", "p95 ms", "p99 ms",
         "floor p50", "consul w/res", "etcd w/res", "kube w/res", "op cpu s", "busy", "floor busy",
         "not ready"],
        rows,
    )
    for n, size in sorted(report.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        if len(size.get("operator_runs_seconds", [])) > 1:
            lines.append(f"runs at N={n} (median shown): operator {size['operator_runs_seconds']} s, "
                         f"floor {size.get('floor_runs_seconds')} s, "
                         f"protocol floor {size.get('protocol_floor_runs_seconds')} s")
    steady = []
    for name, key in (("change -> backend", "change"), ("drift repaired", "drift")):
        for system in ("consul", "etcd"):
            entry = report.get(key, {}).get(system)
            if entry:
                steady.append([f"{name} ({system})", entry.get("count"), entry.get("p50_ms"),
                               entry.get("p99_ms"), entry.get("max_ms"), entry.get("timeouts")])
    if steady:
        n = report.get("steady_n", "?")
        lines += ["", f"Steady state with {n} ConsulServices + {n} EtcdConfigs"]
        lines += _rows(["measure", "n", "p50 ms", "p99 ms", "max ms", "timeouts"], steady)
    lines += _drift_cpu_lines(report)
    idle = report.get("idle")
    if idle:
        w = idle.get("writes", {})
        lines += ["", f"Idle {idle.get('seconds')} s: writes consul={w.get('consul')} etcd={w.get('etcd')} "
                  f"kubernetes={w.get('kubernetes')}  reconciles={idle.get('reconciles')}  "
                  f"cpu={_fmt(idle.get('cpu_seconds'), 2)} s  rss={_fmt(idle.get('rss_mib'))} MiB"]
    restart = report.get("restart")
    if restart:
        w = restart.get("writes", {})
        lines += [f"Restart: caught up in {_fmt(restart.get('caught_up_seconds'), 2)} s "
                  f"({restart.get('criterion')}), reconciles={restart.get('reconciles')}, "
                  f"writes consul={w.get('consul')} etcd={w.get('etcd')} kubernetes={w.get('kubernetes')}, "
                  f"still Ready {restart.get('ready_after')}"]
    memory = report.get("memory") or {}
    if memory.get("rss_mib"):
        per = memory.get("kib_per_resource", {})
        lines += ["", "Operator memory (RSS MiB) at N: " + ", ".join(
            f"{n}: {mib}" + (f" ({per[n]} KiB/resource)" if n in per else "")
            for n, mib in sorted(memory["rss_mib"].items(), key=lambda kv: int(kv[0])))]
    bg = report.get("background")
    if bg:
        quiet, noisy = bg.get("quiet", {}), bg.get("noisy", {})
        lines += [f"Background: {bg.get('objects')} unrelated Secrets+ConfigMaps, "
                  f"{noisy.get('foreign_etcd_writes')} foreign etcd writes in {noisy.get('seconds')} s: "
                  f"operator cpu {quiet.get('cpu_seconds')} -> {noisy.get('cpu_seconds')} s "
                  f"(x{bg.get('cpu_ratio')}), rss {quiet.get('rss_mib')} -> {noisy.get('rss_mib')} MiB "
                  f"(x{bg.get('rss_ratio')}), watch events {noisy.get('watch_events')}; while creating: "
                  f"cpu {bg.get('creating', {}).get('operator_cpu_seconds')} s"]
    lines += [
        "",
        "busy: share of both cores in use on the whole machine during the phase",
        "proto floor: the floor plus the finalizer patch first and the operator's own status",
        f"ratio_to_floor = {_fmt(report.get('ratio_to_floor'), 2)}",
        f"ratio_to_protocol_floor = {_fmt(report.get('ratio_to_protocol_floor'), 2)}",
    ]
    ratio = report.get("drift_cpu_ratio")
    if ratio:
        small, large = ratio.get("sizes", ["?", "?"])
        lines.append(f"drift_cpu_ratio (N={large} / N={small}) = consul {_fmt(ratio.get('consul'), 2)}, "
                     f"etcd {_fmt(ratio.get('etcd'), 2)}")
    return "\n".join(lines)


def _drift_cpu_lines(report: Mapping[str, Any]) -> list[str]:
    """Operator CPU per paced drift events, one row per steady N and backend."""
    rows = []
    for n, steady in sorted((report.get("steady_by_n") or {}).items(), key=lambda kv: int(kv[0])):
        for system, entry in sorted((steady.get("drift_cpu") or {}).items()):
            lat = entry.get("latency", {})
            rows.append([
                f"N={n} {system}", entry.get("events"), entry.get("seconds"), entry.get("cpu_seconds"),
                entry.get("cpu_seconds_above_idle"), entry.get("cpu_ms_per_event"),
                lat.get("p50_ms"), lat.get("p99_ms"), entry.get("timeouts"),
            ])
    if not rows:
        return []
    return ["", "Drift CPU: drifts injected one every "
            f"{report.get('meta', {}).get('drift_gap_seconds', '?')} s, operator CPU until all repaired",
            *_rows(["size/backend", "events", "window s", "op cpu s", "above idle", "cpu ms/event",
                    "repair p50 ms", "repair p99 ms", "timeouts"], rows)]
