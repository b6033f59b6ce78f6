"""The host's operator metrics: Prometheus exposition and the guest IO-rate sampler.

Rules of this module:

* everything is collected at scrape time (:class:`HostCollector`, a custom collector on
  a registry of its own per API app): the adapter's counters through the PF
  (``adapter_get_stats``, ``vf_list``), the VMs and migrations from the inventory, the
  guests' own progress events from their consoles; no thread polls in the background;
* the VF latency histogram is the adapter's own (log2 microsecond buckets): bucket ``i``
  counts [2^i, 2^(i+1)) us, so its upper bound ``le`` is 2^(i+1) us and the last bucket
  is ``+Inf``; the adapter does not keep the sum of latencies, so the histogram has no
  ``_sum`` (and no ``_count``: :data:`vfdirect_vf_ios_total` is the count);
* the guest IO rate over time comes from the VMs' progress events (``verify_progress``,
  ``load_progress``: JSON lines stamped with the wall clock in
  ``RUN_DIR/vms/<vm>/console.log``), read incrementally by :class:`IoSampler` whenever
  somebody asks (a scrape, the dashboard); it keeps a bounded history per VM;
* migration metrics count the migrations this host was the source of (the inventory is
  shared by the hosts: each record is counted once, by its source).
"""

from __future__ import annotations

import collections
import json
import math
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vfdirect.host.service import HostError

if TYPE_CHECKING:
    from vfdirect.host.service import HostService

__all__ = [
    "MIGRATION_BUCKETS_S",
    "HostCollector",
    "IoSampler",
    "adapter_snapshot",
    "make_registry",
    "parse_progress_line",
    "vf_latency_buckets",
]

#: Buckets of the migration phase duration histogram, in seconds.
MIGRATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                       5.0, 10.0, 30.0, 60.0)

#: Events of a guest's console that carry its IO progress.
PROGRESS_EVENTS = frozenset({"verify_progress", "load_progress"})

#: How much of a console a first read looks at (its tail), in bytes.
_FIRST_READ_MAX = 4 << 20


def _iso_ms(text: Any) -> float | None:
    """Milliseconds since the epoch of an event's ``ts`` (``2026-01-01T00:00:00.000Z``)."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000.0
    except ValueError:
        return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """A guest progress event of a console line, else None (other events, text lines,
    half-written lines)."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("event") not in PROGRESS_EVENTS:
        return None
    t = _iso_ms(obj.get("ts"))
    if t is None:
        return None
    obj["t_ms"] = t
    return obj


class _VmSeries:
    """What the sampler knows of one VM's console."""

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        self.partial = b""
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.last: dict[str, Any] | None = None  # the latest progress event
        self._prev_total: float | None = None
        self._prev_t: float | None = None

    def read(self) -> list[str]:
        """New complete lines of the console since the last read."""
        try:
            st = self.path.stat()
        except OSError:
            return []
        if self.inode != st.st_ino or st.st_size < self.offset:
            # a new file (or a truncated one): start again from its tail
            self.inode = st.st_ino
            self.offset = max(0, st.st_size - _FIRST_READ_MAX)
            self.partial = b""
            self._prev_total = self._prev_t = None
        if st.st_size == self.offset:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(st.st_size - self.offset)
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return [ln.decode(errors="replace") for ln in lines]

    def add(self, event: dict[str, Any], host: str) -> None:
        t = float(event["t_ms"])
        sample: dict[str, Any] = {"t": round(t, 1), "host": host, "event": event["event"]}
        reads, writes = _num(event.get("reads")), _num(event.get("writes"))
        total = None if reads is None or writes is None else reads + writes
        if event["event"] == "load_progress":
            sample["iops"] = _num(event.get("iops"))
            sample["p50_us"] = _num(event.get("p50_us"))
            sample["p99_us"] = _num(event.get("p99_us"))
        else:
            iops = None
            if (total is not None and self._prev_total is not None and self._prev_t is not None
                    and total >= self._prev_total and t > self._prev_t):
                iops = round((total - self._prev_total) / ((t - self._prev_t) / 1000.0), 1)
            sample["iops"] = iops
        if total is not None:
            self._prev_total, self._prev_t = total, t
        for key in ("errors", "outstanding", "max_stall_ms"):
            value = _num(event.get(key))
            if value is not None:
                sample[key] = value
        if total is not None:
            sample["ios"] = total
        self.samples.append(sample)
        self.last = {**event, "iops": sample.get("iops")}


class IoSampler:
    """Guest IO rate and latency over time, from the VMs' consoles in ``run_dir/vms``.

    :meth:`poll` reads what the consoles gained since the last call; :meth:`samples`
    gives each VM's history (oldest first), each sample
    ``{"t": ms since the epoch, "host", "event", "iops", "p50_us"?, "p99_us"?, "errors"?,
    "outstanding"?, "max_stall_ms"?, "ios"?}``. Thread-safe."""

    def __init__(self, run_dir: Path, host: str, *, keep: int = 900) -> None:
        self.vms_dir = Path(run_dir) / "vms"
        self.host = host
        self.keep = keep
        self._lock = threading.Lock()
        self._series: dict[str, _VmSeries] = {}

    def poll(self) -> None:
        with self._lock:
            try:
                dirs = sorted(p for p in self.vms_dir.iterdir() if p.is_dir())
            except OSError:
                dirs = []
            for d in dirs:
                series = self._series.get(d.name)
                if series is None:
                    series = self._series[d.name] = _VmSeries(d / "console.log", self.keep)
                for line in series.read():
                    event = parse_progress_line(line)
                    if event is not None:
                        series.add(event, self.host)

    def samples(self, since_ms: float = 0.0) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        with self._lock:
            for vm, series in sorted(self._series.items()):
                newer = [s for s in series.samples if s["t"] > since_ms]
                if newer:
                    out[vm] = newer
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """Each VM's latest progress event (with its ``iops``)."""
        with self._lock:
            return {vm: dict(s.last) for vm, s in sorted(self._series.items())
                    if s.last is not None}


def adapter_snapshot(service: HostService) -> dict[str, Any]:
    """The adapter as the operator sees it, in one PF round trip per call: identity,
    its fabric logins, admin and PF IO counters, and each VF with its state, VM, vport,
    outstanding IO and data-path counters."""
    def get(pf: Any) -> dict[str, Any]:
        return {"identify": pf.adapter_identify(), "vfs": pf.vf_list(),
                "stats": pf.adapter_get_stats(),
                "logins": pf.fabric_show().get("logins", [])}
    out: dict[str, Any] = service.pf_call("adapter_snapshot", get)
    # the fabric is shared by the hosts' adapters: keep this adapter's logins (its
    # physical port and the vports logged in through it, NPIV children of that port)
    phys = (out["identify"].get("physical_port") or {}).get("wwpn")
    out["logins"] = [login for login in out["logins"]
                     if phys is not None and phys in (login.get("wwpn"), login.get("parent"))]
    io = {int(v["vf"]): v for v in out["stats"].get("vfs", [])}
    for vf in out["vfs"]:
        st = io.get(int(vf["vf"]), {})
        vf["io"] = st.get("io")
        if st.get("outstanding") is not None:
            vf["outstanding"] = st["outstanding"]
    out["pid"] = service.adapter.pid
    return out


def vf_latency_buckets(log2_us: list[int]) -> list[tuple[str, float]]:
    """The adapter's log2 microsecond histogram as cumulative Prometheus buckets
    (upper bounds in seconds, the last ``+Inf``)."""
    out: list[tuple[str, float]] = []
    acc = 0
    last = len(log2_us) - 1
    for i, n in enumerate(log2_us):
        acc += int(n)
        le = "+Inf" if i == last else repr((1 << (i + 1)) / 1e6)
        out.append((le, float(acc)))
    if not out:
        out.append(("+Inf", 0.0))
    return out


def _vm_name(vf: dict[str, Any]) -> str:
    vm = vf.get("vm")
    return str(vm.get("name", "")) if isinstance(vm, dict) else ""


def _phase_durations(report: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(phase, seconds) of each finished phase of a migration report."""
    for item in report.get("phases") or []:
        if not isinstance(item, dict):
            continue
        start, end = _num(item.get("start_ns")), _num(item.get("end_ns"))
        if start is None or end is None or end < start:
            continue
        yield str(item.get("phase")), (end - start) / 1e9


def _audit_metrics(host: str, audit: Any) -> Iterator[Metric]:
    """The adapter auditor's counters (``vfdirect adapter run --audit``), when it runs."""
    if not isinstance(audit, dict) or not audit.get("enabled"):
        return
    for key, text in (("checks", "Accesses the adapter's auditor checked"),
                      ("memory_violations", "VF guest-memory accesses outside the memory "
                                            "table granted (must stay 0)"),
                      ("extent_violations", "Physical IOs outside the extents of the "
                                            "mapping served (must stay 0)")):
        family = CounterMetricFamily(f"vfdirect_audit_{key}", text, labels=["host"])
        family.add_metric([host], float(_num(audit.get(key)) or 0))
        yield family


class HostCollector(Collector):
    """Every metric of one host, gathered when Prometheus scrapes."""

    def __init__(self, service: HostService, sampler: IoSampler) -> None:
        self.service = service
        self.sampler = sampler

    def collect(self) -> Iterable[Metric]:
        host = self.service.name
        yield from self._adapter(host)
        yield from self._vms(host)
        yield from self._guests(host)
        yield from self._migrations(host)

    # -- adapter and VFs -----------------------------------------------------------

    def _adapter(self, host: str) -> Iterator[Metric]:
        up = GaugeMetricFamily("vfdirect_adapter_up",
                               "1 if the host reached its adapter through the PF", labels=["host"])
        try:
            snap = adapter_snapshot(self.service)
        except (HostError, OSError):  # a scrape reports the adapter down, not a 500
            up.add_metric([host], 0.0)
            yield up
            return
        up.add_metric([host], 1.0)
        yield up
        stats = snap["stats"]
        req = CounterMetricFamily("vfdirect_pf_admin_requests",
                                  "PF admin requests served, by method",
                                  labels=["host", "method"])
        for method, n in sorted(stats.get("requests", {}).items()):
            req.add_metric([host, method], float(n))
        yield req
        err = CounterMetricFamily("vfdirect_pf_admin_errors",
                                  "PF admin requests refused, by error code",
                                  labels=["host", "code"])
        for code, n in sorted(stats.get("errors", {}).items()):
            err.add_metric([host, code], float(n))
        yield err
        pf_io = stats.get("pf_io", {})
        cmds = CounterMetricFamily("vfdirect_pf_io_commands",
                                   "SCSI commands submitted through the PF (mediated path)",
                                   labels=["host"])
        cmds.add_metric([host], float(pf_io.get("commands", 0)))
        yield cmds
        pbytes = CounterMetricFamily("vfdirect_pf_io_bytes",
                                     "Bytes moved by the PF IO path (in: to the host, "
                                     "out: to storage)", labels=["host", "direction"])
        pbytes.add_metric([host, "in"], float(pf_io.get("bytes_in", 0)))
        pbytes.add_metric([host, "out"], float(pf_io.get("bytes_out", 0)))
        yield pbytes
        pcc = CounterMetricFamily("vfdirect_pf_io_check_conditions",
                                  "PF IO commands answered CHECK CONDITION", labels=["host"])
        pcc.add_metric([host], float(pf_io.get("check_conditions", 0)))
        yield pcc
        logins = GaugeMetricFamily("vfdirect_fabric_logins",
                                   "Ports this adapter has logged in to the fabric "
                                   "(physical port and vports)", labels=["host"])
        logins.add_metric([host], float(len(snap.get("logins", []))))
        yield logins
        yield from _audit_metrics(host, stats.get("audit"))
        yield from self._vfs(host, snap["vfs"])

    def _vfs(self, host: str, vfs: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["host", "vf", "vm"]
        info = GaugeMetricFamily("vfdirect_vf_info",
                                 "1 per enabled VF, with its state, VM and bound vport",
                                 labels=["host", "vf", "vm", "state", "vport", "error"])
        outstanding = GaugeMetricFamily("vfdirect_vf_outstanding",
                                        "Requests the VF has fetched and not yet completed",
                                        labels=labels)
        ios = CounterMetricFamily("vfdirect_vf_ios", "SCSI commands the VF completed",
                                  labels=labels)
        reads = CounterMetricFamily("vfdirect_vf_reads", "READ commands the VF completed",
                                    labels=labels)
        writes = CounterMetricFamily("vfdirect_vf_writes", "WRITE commands the VF completed",
                                     labels=labels)
        nbytes = CounterMetricFamily("vfdirect_vf_bytes",
                                     "Bytes the VF moved (in: to the guest, out: from it)",
                                     labels=[*labels, "direction"])
        sense = CounterMetricFamily("vfdirect_vf_errors",
                                    "Commands answered CHECK CONDITION, by sense key",
                                    labels=[*labels, "sense_key"])
        transport = CounterMetricFamily("vfdirect_vf_transport_errors",
                                        "Requests that failed before a logical unit: "
                                        "bad_target, overrun, ring faults",
                                        labels=[*labels, "kind"])
        latency = HistogramMetricFamily(
            "vfdirect_vf_latency_seconds",
            "Command latency in the VF (fetch to completion), the adapter's log2 "
            "microsecond buckets; no _sum (the adapter keeps none)", labels=labels)
        for vf in vfs:
            if vf.get("state") == "DISABLED":
                continue
            key = [host, str(vf["vf"]), _vm_name(vf)]
            info.add_metric([*key[:3], str(vf.get("state", "")), str(vf.get("vport") or ""),
                             str(vf.get("error") or "")], 1.0)
            outstanding.add_metric(key, float(vf.get("outstanding") or 0))
            io = vf.get("io")
            if not isinstance(io, dict):
                continue
            ios.add_metric(key, float(io.get("ios", 0)))
            reads.add_metric(key, float(io.get("reads", 0)))
            writes.add_metric(key, float(io.get("writes", 0)))
            nbytes.add_metric([*key, "in"], float(io.get("bytes_in", 0)))
            nbytes.add_metric([*key, "out"], float(io.get("bytes_out", 0)))
            errors = io.get("errors", {})
            for name, n in sorted(errors.get("by_sense_key", {}).items()):
                sense.add_metric([*key, str(name)], float(n))
            for kind, field in (("bad_target", "bad_target"), ("overrun", "overrun"),
                                ("fault", "faults")):
                transport.add_metric([*key, kind], float(errors.get(field, 0)))
            latency.add_metric(key, vf_latency_buckets(list(io.get("latency_us_log2", []))),
                               None)
        yield from (info, outstanding, ios, reads, writes, nbytes, sense, transport, latency)

    # -- VMs -----------------------------------------------------------------------

    def _vms(self, host: str) -> Iterator[Metric]:
        state = GaugeMetricFamily("vfdirect_vm_state",
                                  "1 per VM this host runs, with its state, VF and vport",
                                  labels=["host", "vm", "state", "vf", "vport"])
        for vm in self.service.inv.vm_list(host=host):
            state.add_metric([host, vm.name, vm.state.value,
                              "" if vm.vf is None else str(int(vm.vf)),
                              "" if vm.vport is None else vm.vport.canonical()], 1.0)
        yield state

    def _guests(self, host: str) -> Iterator[Metric]:
        self.sampler.poll()
        labels = ["host", "vm", "workload"]
        iops = GaugeMetricFamily("vfdirect_vm_guest_iops",
                                 "IOs per second the guest's workload saw in its last "
                                 "progress interval", labels=labels)
        lat = GaugeMetricFamily("vfdirect_vm_guest_latency_seconds",
                                "IO latency quantiles the guest measured in its last "
                                "progress interval (load workload)",
                                labels=[*labels, "quantile"])
        ios = CounterMetricFamily("vfdirect_vm_guest_ios",
                                  "IOs the guest's workload completed (since its start)",
                                  labels=labels)
        errs = CounterMetricFamily("vfdirect_vm_guest_errors",
                                   "IO errors and verify mismatches the guest saw",
                                   labels=labels)
        outst = GaugeMetricFamily("vfdirect_vm_guest_outstanding",
                                  "IOs the guest had submitted and not seen complete",
                                  labels=labels)
        stall = GaugeMetricFamily("vfdirect_vm_guest_max_stall_seconds",
                                  "Longest time the guest waited with IO outstanding and "
                                  "none completing", labels=labels)
        live = {v.name for v in self.service.inv.vm_list(host=host)}
        for vm, ev in self.sampler.latest().items():
            if vm not in live:
                continue  # migrated away or deleted: its old console is history
            key = [host, vm, str(ev["event"]).removesuffix("_progress")]
            if _num(ev.get("iops")) is not None:
                iops.add_metric(key, float(ev["iops"]))
            for q, field in (("0.5", "p50_us"), ("0.99", "p99_us")):
                value = _num(ev.get(field))
                if value is not None:
                    lat.add_metric([*key, q], value / 1e6)
            r, w = _num(ev.get("reads")), _num(ev.get("writes"))
            if r is not None and w is not None:
                ios.add_metric(key, r + w)
            if _num(ev.get("errors")) is not None:
                errs.add_metric(key, float(ev["errors"]))
            if _num(ev.get("outstanding")) is not None:
                outst.add_metric(key, float(ev["outstanding"]))
            if _num(ev.get("max_stall_ms")) is not None:
                stall.add_metric(key, float(ev["max_stall_ms"]) / 1000.0)
        yield from (iops, lat, ios, errs, outst, stall)

    # -- migrations ----------------------------------------------------------------

    def _migrations(self, host: str) -> Iterator[Metric]:
        total = CounterMetricFamily("vfdirect_migrations",
                                    "Live migrations this host was the source of, by outcome",
                                    labels=["host", "outcome"])
        phase_hist = HistogramMetricFamily(
            "vfdirect_migration_phase_seconds",
            "Duration of each phase of the migrations this host was the source of",
            labels=["host", "phase"])
        last_phase = GaugeMetricFamily(
            "vfdirect_migration_last_phase_seconds",
            "Phase durations of each VM's latest migration from this host",
            labels=["host", "vm", "migration", "phase"])
        last_down = GaugeMetricFamily(
            "vfdirect_migration_last_downtime_seconds",
            "How long the VM was paused in its latest migration from this host",
            labels=["host", "vm", "migration"])
        last_stall = GaugeMetricFamily(
            "vfdirect_migration_last_worst_stall_seconds",
            "Longest IO stall the guest saw in its latest migration from this host",
            labels=["host", "vm", "migration"])
        last_rounds = GaugeMetricFamily(
            "vfdirect_migration_last_precopy_rounds",
            "Pre-copy rounds of the VM's latest migration from this host",
            labels=["host", "vm", "migration"])
        last_out = GaugeMetricFamily(
            "vfdirect_migration_last_outstanding_at_quiesce",
            "Requests in flight when the VF stopped fetching, latest migration",
            labels=["host", "vm", "migration"])
        outcomes: collections.Counter[str] = collections.Counter()
        durations: dict[str, list[float]] = collections.defaultdict(list)
        seen_vms: set[str] = set()
        for mig in self.service.inv.migration_list(limit=1000):
            if mig.source != host:
                continue
            outcomes[mig.outcome] += 1
            report = dict(mig.phases)
            if mig.outcome != "running":
                for phase, seconds in _phase_durations(report):
                    durations[phase].append(seconds)
            if mig.vm in seen_vms:
                continue
            seen_vms.add(mig.vm)  # newest first: this is the VM's latest
            key = [host, mig.vm, mig.id]
            for phase, seconds in _phase_durations(report):
                last_phase.add_metric([*key, phase], seconds)
            if _num(report.get("downtime_ns")) is not None:
                last_down.add_metric(key, float(report["downtime_ns"]) / 1e9)
            if _num(report.get("worst_stall_ms")) is not None:
                last_stall.add_metric(key, float(report["worst_stall_ms"]) / 1000.0)
            if isinstance(report.get("precopy_rounds"), list):
                last_rounds.add_metric(key, float(len(report["precopy_rounds"])))
            if _num(report.get("outstanding_at_quiesce")) is not None:
                last_out.add_metric(key, float(report["outstanding_at_quiesce"]))
        for outcome in sorted(outcomes):
            total.add_metric([host, outcome], float(outcomes[outcome]))
        for phase in sorted(durations):
            values = durations[phase]
            buckets: list[tuple[str, float]] = [
                (repr(le), float(sum(1 for v in values if v <= le)))
                for le in MIGRATION_BUCKETS_S]
            buckets.append(("+Inf", float(len(values))))
            phase_hist.add_metric([host, phase], buckets, sum(values))
        yield from (total, phase_hist, last_phase, last_down, last_stall, last_rounds,
                    last_out)


def make_registry(service: HostService, sampler: IoSampler) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding the host's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(service, sampler))
    return registry

