// vfdirect dashboard: plain JavaScript, SVG charts drawn here, data from the host that
// served the page (/v1/stream server-sent events, /v1/cluster once at load).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const CHART_WINDOW_MS = 120000;   // the per-VM charts show the last two minutes
const KEEP_MS = 15 * 60000;       // samples kept in the page
const PHASE_ORDER = ["prepare", "quiesce", "drain", "handoff", "mediated", "precopy",
                     "stop_copy", "destination", "commit", "abort"];
const PHASE_COLOR = {
  prepare: "#64748b", quiesce: "#f59e0b", drain: "#ef4444", handoff: "#a855f7",
  mediated: "#7c3aed", precopy: "#0ea5e9", stop_copy: "#dc2626", destination: "#10b981",
  commit: "#15803d", abort: "#991b1b",
};
const HOST_COLORS = ["#2563eb", "#ea580c", "#0d9488", "#9333ea", "#ca8a04"];

const store = {
  snap: null,
  io: new Map(),      // vm -> Map(host|t -> guest sample)
  vf: new Map(),      // vm -> [{t, host, iops, p50_us, p99_us}] from the VF counters
  vfPrev: new Map(),  // host|vf -> {t, ios, hist, vm}
  selected: null,     // migration id shown in the timeline (default: the newest)
  hostColor: new Map(),
};

// -- small helpers ------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function badge(text, cls) { return el("span", { class: `badge ${cls || text}` }, text); }
function num(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits ?? 0 });
}
function fmtUs(us) {
  if (us === null || us === undefined) return "–";
  return us >= 1000 ? `${num(us / 1000, 2)} ms` : `${num(us, 0)} µs`;
}
function fmtMs(ms) { return ms === null || ms === undefined ? "–" : `${num(ms, 1)} ms`; }
function hostColor(name) {
  if (!store.hostColor.has(name)) {
    store.hostColor.set(name, HOST_COLORS[store.hostColor.size % HOST_COLORS.length]);
  }
  return store.hostColor.get(name);
}
function replace(id, ...children) {
  const node = document.getElementById(id);
  node.replaceChildren(...children.flat());
  return node;
}
function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

// -- data ---------------------------------------------------------------------------------

function ingest(snap) {
  store.snap = snap;
  for (const h of snap.hosts) hostColor(h.name);
  for (const [vm, samples] of Object.entries(snap.io || {})) {
    if (!store.io.has(vm)) store.io.set(vm, new Map());
    const m = store.io.get(vm);
    for (const s of samples) m.set(`${s.host}|${s.t}`, s);
  }
  const horizon = snap.at - KEEP_MS;
  for (const m of store.io.values()) {
    for (const [k, s] of m) if (s.t < horizon) m.delete(k);
  }
  ingestVfCounters(snap);
}

// Per-VM IO rate and latency quantiles from the VF counters of consecutive snapshots
// (the adapter's log2 microsecond histogram: bucket i holds [2^i, 2^(i+1)) µs).
function ingestVfCounters(snap) {
  for (const h of snap.hosts) {
    for (const vf of (h.adapter && h.adapter.vfs) || []) {
      const vm = vf.vm && vf.vm.name;
      const io = vf.io;
      const key = `${h.name}|${vf.vf}`;
      if (!vm || !io) { store.vfPrev.delete(key); continue; }
      const prev = store.vfPrev.get(key);
      const cur = { t: snap.at, ios: io.ios, hist: io.latency_us_log2 || [], vm };
      store.vfPrev.set(key, cur);
      if (!prev || prev.vm !== vm || cur.ios < prev.ios || cur.t <= prev.t) continue;
      const delta = cur.hist.map((n, i) => n - (prev.hist[i] || 0));
      const total = delta.reduce((a, b) => a + b, 0);
      const q = (frac) => {
        if (total <= 0) return null;
        let acc = 0;
        for (let i = 0; i < delta.length; i++) {
          acc += delta[i];
          if (acc >= frac * total) return Math.pow(2, i) * Math.SQRT2; // bucket's middle
        }
        return null;
      };
      if (!store.vf.has(vm)) store.vf.set(vm, []);
      const list = store.vf.get(vm);
      list.push({ t: cur.t, host: h.name, iops: (cur.ios - prev.ios) / ((cur.t - prev.t) / 1000),
                  p50_us: q(0.5), p99_us: q(0.99) });
      while (list.length && list[0].t < snap.at - KEEP_MS) list.shift();
    }
  }
}

function guestSamples(vm) {
  const m = store.io.get(vm);
  return m ? [...m.values()].sort((a, b) => a.t - b.t) : [];
}

function latestGuest(vm) {
  const s = guestSamples(vm);
  return s.length ? s[s.length - 1] : null;
}

function migrationTimes(mig) {
  const phases = ((mig.report && mig.report.phases) || []).map((p) => ({
    phase: p.phase,
    start: p.start_ns / 1e6,
    end: p.end_ns === null || p.end_ns === undefined ? null : p.end_ns / 1e6,
  }));
  phases.sort((a, b) => (PHASE_ORDER.indexOf(a.phase) - PHASE_ORDER.indexOf(b.phase)));
  return phases;
}

// -- rendering ----------------------------------------------------------------------------

function render() {
  const snap = store.snap;
  if (!snap) return;
  document.getElementById("served-by").textContent = snap.served_by;
  document.getElementById("updated").textContent =
    `updated ${new Date(snap.at).toLocaleTimeString()}`;
  renderHosts(snap);
  renderVms(snap);
  renderMigrations(snap);
  renderVports(snap);
  renderMappings(snap);
}

function renderHosts(snap) {
  const vmOfVport = new Map();
  for (const p of snap.vports) {
    vmOfVport.set(p.wwpn, p.vm);
    if (p.alternate_wwpn) vmOfVport.set(p.alternate_wwpn, p.vm);
  }
  const cards = snap.hosts.map((h) => {
    const a = h.adapter;
    const head = el("div", { class: "card-head" },
      el("h3", {}, h.name), badge(h.state),
      h.self ? el("span", { class: "sub" }, "(this host)") : null,
      h.reachable ? null : el("span", { class: "error-text" }, h.error || "unreachable"));
    if (!a) return el("div", { class: "card host", "data-host": h.name }, head);
    const id = a.identify || {};
    const port = id.physical_port || {};
    const pfIo = (a.stats && a.stats.pf_io) || {};
    const kv = el("div", { class: "kv" },
      el("span", {}, "PF ", el("b", { class: "mono" }, port.wwpn || "–")),
      el("span", {}, "N_Port ", el("b", { class: "mono" }, port.nport_id || "–")),
      el("span", {}, "VFs ", el("b", {}, `${id.vfs_enabled ?? "–"}/${id.max_vfs ?? "–"}`)),
      el("span", {}, "adapter pid ", el("b", {}, a.pid ?? "–")),
      el("span", {}, "PF IO (mediated) ", el("b", {}, num(pfIo.commands))));
    const rows = a.vfs.filter((vf) => vf.state !== "DISABLED").map((vf) => {
      const io = vf.io || {};
      const errs = io.errors || {};
      const sense = Object.entries(errs.by_sense_key || {}).map(([k, n]) => `${k}:${n}`).join(" ");
      const vm = vf.vm && vf.vm.name;
      const fault = vf.error || (io.fault ? `fault: ${io.fault}` : null);
      return el("tr", { class: vm ? "assigned" : "", "data-vf": vf.vf, "data-vm": vm || "" },
        el("td", { class: "num" }, vf.vf),
        el("td", {}, badge(vf.state)),
        el("td", {}, vm || "–"),
        el("td", { class: "mono" }, vf.vport || "–"),
        el("td", {}, vf.mapping_luns ? `${vf.mapping_luns} LUN · gen ${vf.mapping_generation}` : "–"),
        el("td", { class: "num" }, num(vf.outstanding)),
        el("td", { class: "num" }, num(io.ios)),
        el("td", {}, `${num(errs.check_conditions || 0)}${sense ? " (" + sense + ")" : ""}`),
        el("td", { class: fault ? "error-text" : "sub" }, fault || "ok"));
    });
    const vfTable = el("table", { class: "grid vf-table", "data-host": h.name },
      el("thead", {}, el("tr", {}, ["VF", "queue state", "VM", "bound vport", "mapping", "outst.",
        "IOs", "errors", "error state"].map((t) => el("th", {}, t)))),
      el("tbody", {}, rows));
    const logins = (a.logins || []).map((l) => el("tr", {},
      el("td", { class: "mono" }, l.wwpn),
      el("td", { class: "mono" }, typeof l.nport_id === "number"
        ? "0x" + l.nport_id.toString(16).padStart(6, "0") : String(l.nport_id)),
      el("td", {}, l.parent ? "vport (NPIV)" : "physical port"),
      el("td", {}, vmOfVport.get(l.wwpn) || "–")));
    const loginTable = el("table", { class: "grid login-table", "data-host": h.name },
      el("thead", {}, el("tr", {}, ["fabric login WWPN", "N_Port ID", "kind", "VM"].map(
        (t) => el("th", {}, t)))),
      el("tbody", {}, logins));
    return el("div", { class: "card host", "data-host": h.name }, head, kv, vfTable,
      el("div", { style: "height:8px" }), loginTable);
  });
  replace("hosts", cards);
}

function renderVms(snap) {
  const body = document.querySelector("#vm-table tbody");
  body.replaceChildren(...snap.vms.map((v) => {
    const g = latestGuest(v.name);
    const vfs = store.vf.get(v.name) || [];
    const lastVf = vfs.length ? vfs[vfs.length - 1] : null;
    const p99 = g && g.p99_us !== undefined && g.p99_us !== null ? g.p99_us
      : (lastVf ? lastVf.p99_us : null);
    return el("tr", { "data-vm": v.name },
      el("td", {}, el("b", {}, v.name)), el("td", {}, v.host || "–"),
      el("td", {}, badge(v.state)), el("td", { class: "num" }, v.vf ?? "–"),
      el("td", { class: "mono" }, v.vport || "–"),
      el("td", { class: "num" }, g && v.state === "running" ? num(g.iops, 0) : "–"),
      el("td", { class: "num" }, v.state === "running" ? fmtUs(p99) : "–"),
      el("td", { class: "num" }, g ? num(g.errors) : "–"),
      el("td", {}, v.mapping.map((m) => `${m.name} (${m.target}:${m.lun})`).join(", ") || "–"));
  }));
  const live = snap.vms.filter((v) => ["running", "migrating", "paused"].includes(v.state)
    || store.io.has(v.name));
  replace("vm-charts", live.map((v) => vmChart(v, snap.at)));
}

// ticks every "nice" step, placed at whole steps from ``origin`` (default: the epoch)
function axisTicks(g, x, t0, t1, y, label, origin) {
  const step = niceStep((t1 - t0) / 1000, 6) * 1000;
  const o = origin ?? 0;
  for (let t = o + Math.ceil((t0 - o) / step) * step; t <= t1; t += step) {
    g.append(svg("line", { x1: x(t), x2: x(t), y1: y - 4, y2: y, stroke: "#c7ccd6" }));
    g.append(svg("text", { x: x(t), y: y + 12, "text-anchor": "middle" }, label(t)));
  }
}

function polyline(points, color, extra) {
  if (points.length === 0) return null;
  return svg("polyline", { points: points.map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" "),
    fill: "none", stroke: color, "stroke-width": 1.6, ...(extra || {}) });
}

function vmChart(v, now) {
  const W = 560, H = 170, L = 46, R = 64, T = 10, B = 22;
  const t1 = now, t0 = now - CHART_WINDOW_MS;
  const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
  const guest = guestSamples(v.name).filter((s) => s.t >= t0 && s.iops !== null && s.iops !== undefined);
  const vfs = (store.vf.get(v.name) || []).filter((s) => s.t >= t0);
  const iopsSeries = guest.length ? guest : vfs;
  const maxIops = Math.max(1, ...iopsSeries.map((s) => s.iops || 0)) * 1.15;
  const guestLat = guest.filter((s) => s.p99_us !== null && s.p99_us !== undefined);
  const latSeries = guestLat.length ? guestLat : vfs.filter((s) => s.p99_us !== null);
  const maxLat = Math.max(10, ...latSeries.map((s) => s.p99_us || 0)) * 1.15;
  const yI = (val) => T + (1 - val / maxIops) * (H - T - B);
  const yL = (val) => T + (1 - val / maxLat) * (H - T - B);
  const g = svg("g", {});
  g.append(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafbfc", stroke: "#e5e7eb" }));
  axisTicks(g, x, t0, t1, H - B, (t) => `${Math.round((t - t1) / 1000)}s`, t1);
  g.append(svg("text", { x: L - 4, y: T + 9, "text-anchor": "end" }, num(maxIops / 1.15, 0)));
  g.append(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
  g.append(svg("text", { x: W - R + 4, y: T + 9 }, fmtUs(maxLat / 1.15)));
  // one IOPS line per host the VM ran on (a migration changes the colour)
  const byHost = new Map();
  for (const s of iopsSeries) {
    if (!byHost.has(s.host)) byHost.set(s.host, []);
    byHost.get(s.host).push([x(s.t), yI(s.iops || 0)]);
  }
  for (const [host, pts] of byHost) g.append(polyline(pts, hostColor(host), { class: "iops-line", "data-host": host }));
  g.append(polyline(latSeries.map((s) => [x(s.t), yL(s.p99_us)]), "#f97316",
    { "stroke-dasharray": "4 3", class: "latency-line" }));
  const p50 = latSeries.filter((s) => s.p50_us !== null && s.p50_us !== undefined);
  g.append(polyline(p50.map((s) => [x(s.t), yL(s.p50_us)]), "#fdba74",
    { "stroke-dasharray": "2 3", class: "latency-line" }));
  for (const mig of (store.snap.migrations || []).filter((m) => m.vm === v.name)) {
    for (const p of migrationTimes(mig)) {
      if (p.phase !== "stop_copy" && p.phase !== "mediated") continue;
      const a = Math.max(t0, p.start), b = Math.min(t1, p.end ?? now);
      if (b <= t0 || a >= t1) continue;
      g.append(svg("rect", { x: x(a), y: T, width: Math.max(1.5, x(b) - x(a)), height: H - T - B,
        fill: PHASE_COLOR[p.phase], opacity: 0.18 }));
    }
  }
  const latSrc = guestLat.length ? "guest" : "VF";
  return el("div", { class: "card chart", "data-vm": v.name },
    el("div", { class: "card-head" }, el("b", {}, v.name), badge(v.state),
      el("span", { class: "sub" }, `on ${v.host || "–"}`)),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "vm-chart" }, g),
    el("div", { class: "legend" },
      ...[...byHost.keys()].map((h) => el("span", {}, el("i", { style: `background:${hostColor(h)}` }), `IOPS on ${h}`)),
      el("span", {}, el("i", { style: "background:#f97316" }), `p99 latency (${latSrc})`),
      el("span", {}, el("i", { style: "background:#fdba74" }), `p50 latency (${latSrc})`)));
}

function renderMigrations(snap) {
  const migs = snap.migrations || [];
  const body = document.querySelector("#migration-table tbody");
  body.replaceChildren(...migs.map((m) => {
    const r = m.report || {};
    const summary = (r.summary || []).map(([p, ms]) => `${p} ${ms === null ? "…" : num(ms, 1)}`).join(", ");
    return el("tr", { "data-migration": m.id, class: m.id === selectedMigration(snap)?.id ? "assigned" : "",
      style: "cursor:pointer", onclick: () => { store.selected = m.id; render(); } },
      el("td", { class: "mono" }, m.id), el("td", {}, m.vm),
      el("td", {}, `${m.source || "?"} → ${m.destination || "?"}`),
      el("td", {}, badge(m.outcome, m.outcome === "running" ? "running-mig" : m.outcome)),
      el("td", { class: "num" }, r.downtime_ns ? fmtMs(r.downtime_ns / 1e6) : "–"),
      el("td", { class: "num" }, Array.isArray(r.precopy_rounds) ? r.precopy_rounds.length : "–"),
      el("td", { class: "num" }, r.outstanding_at_quiesce ?? "–"),
      el("td", { class: "num" }, r.worst_stall_ms !== null && r.worst_stall_ms !== undefined ? fmtMs(r.worst_stall_ms) : "–"),
      el("td", { class: "sub wrap" }, summary || "–"));
  }));
  renderTimeline(snap, selectedMigration(snap));
}

function selectedMigration(snap) {
  const migs = snap.migrations || [];
  return migs.find((m) => m.id === store.selected) || migs[0] || null;
}

function renderTimeline(snap, mig) {
  const box = document.getElementById("timeline");
  if (!mig) {
    box.replaceChildren();
    box.setAttribute("height", "30");
    box.removeAttribute("data-migration");
    return;
  }
  const phases = migrationTimes(mig);
  const now = snap.at;
  const W = Math.max(600, box.clientWidth || box.getBoundingClientRect().width || 1000);
  const L = 96, R = 16, IO_H = 120, ROW = 18, TOP = 8;
  const H = TOP + IO_H + 14 + phases.length * ROW + 24;
  box.setAttribute("height", H);
  box.setAttribute("viewBox", `0 0 ${W} ${H}`);
  box.setAttribute("data-migration", mig.id);
  box.setAttribute("data-outcome", mig.outcome);
  const starts = phases.map((p) => p.start);
  const ends = phases.map((p) => p.end ?? now);
  const m0 = starts.length ? Math.min(...starts) : Date.parse(mig.started_at);
  const m1 = ends.length ? Math.max(...ends) : now;
  const pad = Math.max(4000, (m1 - m0) * 0.25);
  const t0 = m0 - pad, t1 = Math.min(m1 + pad, Math.max(m1, now));
  const x = (t) => L + (t - t0) / Math.max(1, t1 - t0) * (W - L - R);
  const g = svg("g", {});
  // the guest's IO rate (from its progress events on every host), behind the phases
  const samples = guestSamples(mig.vm).filter((s) => s.t >= t0 && s.t <= t1 && s.iops !== null && s.iops !== undefined);
  const vfs = (store.vf.get(mig.vm) || []).filter((s) => s.t >= t0 && s.t <= t1);
  const series = samples.length ? samples : vfs;
  const maxIops = Math.max(1, ...series.map((s) => s.iops || 0)) * 1.15;
  const y = (v) => TOP + (1 - v / maxIops) * IO_H;
  g.append(svg("rect", { x: L, y: TOP, width: W - L - R, height: IO_H, fill: "#fafbfc", stroke: "#e5e7eb" }));
  g.append(svg("text", { x: L - 6, y: TOP + 10, "text-anchor": "end" }, `${num(maxIops / 1.15, 0)}`));
  g.append(svg("text", { x: L - 6, y: TOP + IO_H, "text-anchor": "end" }, "0"));
  g.append(svg("text", { x: 4, y: TOP + IO_H / 2, class: "phase-label" }, "guest IOPS"));
  for (const p of phases) {
    if (p.phase !== "mediated" && p.phase !== "stop_copy") continue;
    g.append(svg("rect", { x: x(p.start), y: TOP, width: Math.max(2, x(p.end ?? now) - x(p.start)),
      height: IO_H, fill: PHASE_COLOR[p.phase], opacity: 0.15, class: `band band-${p.phase}` }));
  }
  const byHost = new Map();
  for (const s of series) {
    if (!byHost.has(s.host)) byHost.set(s.host, []);
    byHost.get(s.host).push(s);
  }
  for (const [host, list] of byHost) {
    const pts = list.map((s) => [x(s.t), y(s.iops || 0)]);
    const area = [[pts[0][0], TOP + IO_H], ...pts, [pts[pts.length - 1][0], TOP + IO_H]];
    g.append(svg("polygon", { points: area.map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" "),
      fill: hostColor(host), opacity: 0.12 }));
    g.append(polyline(pts, hostColor(host), { class: "io-rate", "data-host": host }));
    for (const [px, py] of pts) g.append(svg("circle", { cx: px, cy: py, r: 2, fill: hostColor(host) }));
  }
  // one bar per phase on the same time axis
  phases.forEach((p, i) => {
    const yy = TOP + IO_H + 14 + i * ROW;
    const end = p.end ?? now;
    const ms = end - p.start;
    g.append(svg("text", { x: L - 6, y: yy + 12, "text-anchor": "end", class: "phase-label" }, p.phase));
    g.append(svg("line", { x1: L, x2: W - R, y1: yy + ROW / 2, y2: yy + ROW / 2, stroke: "#eef0f4" }));
    const bar = svg("rect", { x: x(p.start), y: yy + 2, width: Math.max(3, x(end) - x(p.start)), height: ROW - 4,
      rx: 2, fill: PHASE_COLOR[p.phase] || "#888", class: "phase", "data-phase": p.phase,
      "data-ms": ms.toFixed(3), "data-open": p.end === null ? "1" : "0" },
      svg("title", {}, `${p.phase}: ${num(ms, 1)} ms${p.end === null ? " (running)" : ""}`));
    g.append(bar);
    g.append(svg("text", { x: Math.min(W - R - 60, x(end) + 4), y: yy + 12 }, `${num(ms, ms < 10 ? 2 : 0)} ms`));
  });
  axisTicks(g, x, t0, t1, H - 18, (t) => `${t >= m0 ? "+" : ""}${((t - m0) / 1000).toFixed(1)}s`, m0);
  box.replaceChildren(g);
  const r = mig.report || {};
  document.getElementById("timeline-title").textContent =
    `${mig.id}: ${mig.vm} ${mig.source} → ${mig.destination}, ${mig.outcome}` +
    (r.downtime_ns ? `, downtime ${fmtMs(r.downtime_ns / 1e6)}` : "") +
    (r.worst_stall_ms !== null && r.worst_stall_ms !== undefined ? `, worst guest stall ${fmtMs(r.worst_stall_ms)}` : "");
  replace("timeline-legend",
    ...phases.map((p) => el("span", {}, el("i", { style: `background:${PHASE_COLOR[p.phase]}` }), p.phase)),
    ...[...byHost.keys()].map((h) => el("span", {}, el("i", { style: `background:${hostColor(h)}` }), `guest IOPS on ${h}`)));
}

function renderVports(snap) {
  const body = document.querySelector("#vport-table tbody");
  body.replaceChildren(...snap.vports.map((p) => el("tr", { "data-wwpn": p.wwpn },
    el("td", { class: "mono" }, p.wwpn), el("td", { class: "mono" }, p.wwnn),
    el("td", { class: "mono" }, p.alternate_wwpn || "–"), el("td", {}, p.vm || "–"),
    el("td", {}, p.host || "–"),
    el("td", {}, p.logged_in_on.length ? p.logged_in_on.join(", ") : "not logged in"))));
}

function renderMappings(snap) {
  const cards = snap.vms.filter((v) => v.mapping.length).map((v) => {
    const rows = v.mapping.map((m) => el("tr", {},
      el("td", { class: "num" }, m.target),
      el("td", { class: "num" }, m.lun),
      el("td", {}, `${m.name} `, el("span", { class: "sub mono" }, m.vdisk)),
      el("td", { class: "num" }, `${num(m.capacity_blocks * m.block_size / 1048576, 1)} MiB`),
      el("td", { class: "mono" }, m.extents.map(
        (e) => `${e.vlba}→${e.array}:${e.lun} ${e.start}+${e.count}`).join("  "))));
    const head = el("thead", {}, el("tr", {}, ["target", "LUN", "vdisk", "capacity",
      "extents (vLBA → array:LUN start+count)"].map((t) => el("th", {}, t))));
    return el("div", { class: "mapping card", "data-vm": v.name },
      el("div", { class: "card-head" }, el("b", {}, v.name), el("span", { class: "sub" },
        `vport ${v.vport || "–"}: virtual disk address (target, LUN) → vdisk → physical extents`)),
      el("table", { class: "grid" }, head, el("tbody", {}, rows)));
  });
  replace("mappings", cards);
}

// -- live updates -------------------------------------------------------------------------

function setStatus(on, text) {
  const s = document.getElementById("status");
  s.className = `status ${on ? "on" : "off"}`;
  s.dataset.state = on ? "live" : "reconnecting";
  s.textContent = text;
}

function connect() {
  const source = new EventSource("/v1/stream");
  source.addEventListener("cluster", (ev) => {
    ingest(JSON.parse(ev.data));
    setStatus(true, "live");
    render();
  });
  source.addEventListener("problem", (ev) => setStatus(false, JSON.parse(ev.data).error));
  source.onerror = () => setStatus(false, "reconnecting");
}

fetch("/v1/cluster").then((r) => r.json()).then((snap) => { ingest(snap); render(); })
  .catch(() => setStatus(false, "no answer"));
connect();
window.addEventListener("resize", render);
