#!/usr/bin/env python3
"""PNG plots of the benchmarks' JSON output (needs matplotlib: ``pip install -e .[bench]``).

    .venv/bin/python bench/plot.py [--migration migration.json] [--datapath datapath.json]
        [--out docs/perf]

Writes ``migration_downtime.png`` (downtime against guest memory size, per load, median
with the max as an error bar, the targets as dashed lines), ``migration_total.png``
(total migration time and the raw copy of the memory over loopback TCP) and
``datapath_iops.png`` (IOPS of fio and of vfdirect per pattern).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover
    raise SystemExit("matplotlib is not installed (pip install -e '.[bench]')") from None


def _by_load(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["load"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["size_mib"])
    return out


def _size_axis(ax: Any, loads: dict[str, list[dict[str, Any]]]) -> None:
    sizes = sorted({r["size_mib"] for rows in loads.values() for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("guest memory (MiB)")


def plot_migration(data: dict[str, Any], out: Path) -> list[Path]:
    loads = _by_load(data["results"])
    made = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for load, rows in loads.items():
        x = [r["size_mib"] for r in rows]
        med = [r["downtime_ms"]["median"] for r in rows]
        err = [r["downtime_ms"]["max"] - r["downtime_ms"]["median"] for r in rows]
        ax.errorbar(x, med, yerr=[[0] * len(err), err], marker="o", capsize=4,
                    label=f"{load} (median, bar to max)")
    for load, target in data.get("targets_256mib_ms", {}).items():
        if load in loads:
            ax.axhline(target, linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(f"target {load} {target} ms (256 MiB)", (0.01, target),
                        xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    _size_axis(ax, loads)
    ax.set_ylabel("downtime (ms)")
    ax.set_title(f"Live migration downtime ({data['repeat']} migrations per point)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = out / "migration_downtime.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for load, rows in loads.items():
        x = [r["size_mib"] for r in rows]
        ax.plot(x, [r["total_ms"]["median"] for r in rows], marker="o",
                label=f"migration total, {load}")
    raw: dict[int, float] = {}
    for rows in loads.values():
        for r in rows:
            raw.setdefault(r["size_mib"], r["raw_copy_ms"])
    xs = sorted(raw)
    ax.plot(xs, [raw[x] for x in xs], marker="s", linestyle=":", color="black",
            label="raw copy of the memory file (loopback TCP)")
    _size_axis(ax, loads)
    ax.set_yscale("log")
    ax.set_ylabel("time (ms, median)")
    ax.set_title("Live migration total time against a raw copy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    path = out / "migration_total.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    return made


def plot_datapath(data: dict[str, Any], out: Path) -> Path:
    results = data["results"]
    patterns = []
    for r in results:
        key = f"{r['pattern']} QD{r['qd']}"
        if key not in patterns:
            patterns.append(key)
    whos = ["fio-psync", "fio-io_uring", "vfdirect"]
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    width = 0.26
    for i, who in enumerate(whos):
        values = []
        for p in patterns:
            match = [r["iops"] for r in results
                     if f"{r['pattern']} QD{r['qd']}" == p and r["who"] == who]
            values.append(match[0] if match else 0.0)
        ax.bar([j + (i - 1) * width for j in range(len(patterns))], values, width,
               label=who)
    ax.set_xticks(range(len(patterns)), patterns)
    ax.set_yscale("log")
    ax.set_ylabel("IOPS (4 KiB)")
    ax.set_title(f"Datapath: fio on the LUN file vs IO through a VF ({data['regime']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")
    path = out / "datapath_iops.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migration", type=Path, help="bench/migration.py --json output")
    ap.add_argument("--datapath", type=Path, help="bench/datapath.py --json output")
    ap.add_argument("--out", type=Path, default=Path("docs/perf"))
    args = ap.parse_args()
    if args.migration is None and args.datapath is None:
        raise SystemExit("give --migration and/or --datapath")
    args.out.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    try:
        if args.migration is not None:
            made += plot_migration(json.loads(args.migration.read_text()), args.out)
        if args.datapath is not None:
            made.append(plot_datapath(json.loads(args.datapath.read_text()), args.out))
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"cannot plot: {exc!r}") from None
    for p in made:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
