// The Edgefleet console: one page, hash routes, every value shown as text (never as HTML:
// labels, reasons and names come from devices and operators).
"use strict";

const main = document.getElementById("main");
const statusLine = document.getElementById("status");
let session = { role: "viewer", actions: [] };
let timer = null;

function h(tag, attrs, ...children) {
  const svg = ["svg", "polyline", "line", "text", "circle", "rect", "g"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
                 : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") el.addEventListener("click", v);
    else if (k === "style") Object.assign(el.style, v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const ts = (s) => (s ? new Date(s * 1000).toISOString().replace(".000Z", "Z") : "-");
const pill = (text) => h("span", { class: "pill " + String(text) }, text || "-");
const labels = (m) => Object.entries(m || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "-";
const num = (x, d = 3) => (x === undefined || x === null ? "-" : Number(x).toFixed(d));

function table(headers, rows) {
  return h("table", {}, h("tr", {}, headers.map((x) => h("th", {}, x))),
           rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))));
}

async function get(path) {
  const r = await fetch("/api/" + path, { credentials: "same-origin" });
  const doc = await r.json();
  if (!r.ok) throw new Error(doc.error || r.statusText);
  return doc;
}

async function act(action, model) {
  if (!confirm(`${action.replace(".", " ")} ${model}?`)) return;
  const r = await fetch(`/api/act/${action}/${encodeURIComponent(model)}`, {
    method: "POST", credentials: "same-origin",
    headers: { "X-Edgefleet-Action": "confirmed" } });
  const doc = await r.json();
  statusLine.textContent = r.ok ? `${action} ${model}: done` : `${action} ${model}: ${doc.error}`;
  route();
}

function actions(group, model, verbs) {
  const allowed = verbs.filter((v) => session.actions.includes(`${group}.${v}`));
  if (!allowed.length) return null;
  return h("div", { class: "actions" }, allowed.map((v) => h("button", {
    class: ["abort", "rollback", "stop"].includes(v) ? "danger" : "",
    "data-action": `${group}.${v}`, onclick: () => act(`${group}.${v}`, model) }, v)));
}

// --- pages -------------------------------------------------------------------------------
const pages = {};

pages.fleet = async () => {
  const doc = await get("fleet");
  const devices = doc.devices || [];
  const count = (s) => devices.filter((d) => d.status === s).length;
  return [h("h1", {}, "Fleet"),
    h("p", {}, `${devices.length} devices: ${count("DEVICE_STATUS_ONLINE")} online, `
      + `${count("DEVICE_STATUS_OFFLINE")} offline, ${count("DEVICE_STATUS_REVOKED")} revoked`),
    table(["device", "status", "serving", "transport", "labels", "last seen", "agent",
           "refused"],
      devices.map((d) => [
        h("a", { href: `#/device/${encodeURIComponent(d.id)}` }, d.id),
        pill(d.status.replace("DEVICE_STATUS_", "").toLowerCase()),
        (d.models || []).filter((m) => m.serving).map((m) => `${m.name} v${m.version}`)
          .join(", ") || "-",
        d.transport || "-", labels(d.labels), ts(d.last_seen), d.agent_version || "-",
        Object.values(d.refused_reports || {}).reduce((a, n) => a + Number(n), 0) || "-"]))];
};

pages.device = async (id) => {
  const d = await get("device/" + encodeURIComponent(id));
  const drift = await get(`drift?hours=24&device=${encodeURIComponent(id)}`);
  return [h("h1", {}, `Device ${d.id}`),
    h("div", { class: "card" },
      h("p", {}, "status ", pill(d.status.replace("DEVICE_STATUS_", "").toLowerCase()),
        ` · transport ${d.transport || "-"} · last seen ${ts(d.last_seen)} · agent `
        + `${d.agent_version || "-"}`),
      h("p", {}, `labels: ${labels(d.labels)}`),
      h("p", {}, `certificate ${d.certificate_serial} expires ${ts(d.certificate_expires_at)}`),
      h("p", {}, "refused reports: " + (Object.entries(d.refused_reports || {})
        .map(([k, n]) => `${k} ${n}`).join(", ") || "none"))),
    h("h2", {}, "Models"),
    table(["model", "version", "state", "serving", "reason"], (d.models || []).map((m) =>
      [m.name, m.version, pill(m.state), m.serving ? "yes" : "", m.reason || "-"])),
    h("h2", {}, "Drift, last 24 hours"), driftPlot(drift.windows || [], "device"),
    featurePlot(drift.windows || [])];
};

pages.models = async () => {
  const doc = await get("models");
  const rows = (doc.models || []).map((m) => {
    const man = m.manifest || {};
    const lin = man.lineage || {};
    const metrics = man.metrics || {};
    const acc = (metrics.compressed || metrics).accuracy;
    return [m.name, m.version, ts(m.created_at), m.published_by,
      acc !== undefined ? num(acc, 4) : "-",
      [lin.snapshot && `snapshot ${lin.snapshot}`, lin.parent_snapshot && `from ${lin.parent_snapshot}`,
       lin.source && `source ${lin.source}`, lin.region && `region ${lin.region}`]
        .filter(Boolean).join(" · ") || "-",
      m.digest.slice(0, 19) + "…"];
  });
  return [h("h1", {}, "Models"),
    table(["model", "version", "published", "by", "accuracy", "lineage", "digest"], rows)];
};

function rolloutCard(r) {
  const committed = (r.devices || []).filter((d) => d.reported_state === "committed"
    && Number(d.reported_version) === Number(r.version)).length;
  const total = (r.devices || []).length;
  const bar = h("span", {});
  bar.style.width = `${total ? (100 * committed) / total : 0}%`;
  const verbs = r.state === "running" ? ["pause", "abort", "rollback"]
    : r.state === "paused" ? ["resume", "abort", "rollback"] : [];
  return h("div", { class: "card rollout", "data-model": r.model },
    h("h2", {}, `${r.model} → v${r.version} `, pill(r.state)),
    h("p", {}, `step ${r.step} of ${(r.steps || []).length} (${(r.steps || []).join("% → ")}%)`
      + ` · bake ${r.bake_seconds}s · previous v${r.previous_version || "-"} · on failure `
      + `${r.on_failure} · by ${r.created_by} at ${ts(r.created_at)}`),
    h("p", {}, h("span", { class: "bar" }, bar),
      h("span", { class: "progress" }, ` ${committed} of ${total} devices committed`)),
    h("p", {}, "gates: " + ((r.gates || []).join(", ") || "none")
      + (r.reason ? ` · ${r.reason}` : "")),
    (r.quality || []).length ? table(["version", "labelled", "accuracy / MAE", "95% CI"],
      r.quality.map((q) => [q.version, q.labelled,
        q.accuracy !== undefined ? num(q.accuracy, 4) : q.mae !== undefined ? num(q.mae, 4) : "-",
        Number(q.labelled) === 0 ? "-" : q.accuracy !== undefined
          ? `${num(q.accuracy_low)}–${num(q.accuracy_high)}`
          : `${num(q.mae_low)}–${num(q.mae_high)}`])) : null,
    table(["device", "step", "desired", "serving", "state", "reason"], (r.devices || []).map((d) =>
      [d.device_id, d.step, d.desired_version || "-", d.reported_version || "-",
       pill(d.reported_state), d.reason || "-"])),
    actions("rollouts", r.model, verbs));
}

pages.rollouts = async () => {
  const doc = await get("rollouts");
  schedule(2000);  // live: progress moves without a reload
  return [h("h1", {}, "Rollouts"),
    (doc.rollouts || []).length ? doc.rollouts.map(rolloutCard) : h("p", {}, "no rollouts")];
};

pages.experiments = async () => {
  const doc = await get("experiments");
  schedule(5000);
  return [h("h1", {}, "Experiments"), (doc.experiments || []).map((e) => h("div",
    { class: "card experiment", "data-model": e.model },
    h("h2", {}, `${e.model}: v${e.champion} vs v${e.challenger} `, pill(e.state)),
    h("p", {}, `challenger weight ${num(e.weight, 2)} · ${e.device_ids.length} devices · `
      + `test ${e.test} · decision `, pill(e.decision || "wait"),
      ` ${e.decision_reason || ""}` + (e.p_value ? ` (p = ${num(e.p_value, 4)})` : "")),
    table(["arm", "version", "requests", "errors", "p95 ms", "labelled",
           e.task === "regression" ? "MAE" : "accuracy", "95% CI"],
      (e.arms || []).map((a) => [a.role, a.version, a.requests, a.errors, num(a.p95_ms, 2),
        a.labelled,
        a.task === "regression" ? num(a.mae, 4)
          : a.labelled > 0 ? num(a.correct / a.labelled, 4) : "-",
        a.task === "regression" ? `${num(a.mae_low)}–${num(a.mae_high)}`
          : `${num(a.accuracy_low)}–${num(a.accuracy_high)}`])),
    e.state === "running" ? actions("experiments", e.model, ["stop"]) : null)),
    (doc.experiments || []).length ? null : h("p", {}, "no experiments")];
};

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                "#17becf"];

function lines(series, { title, yLabel }) {
  // series: [{name, points: [[t, y], ...]}]
  const all = series.flatMap((s) => s.points);
  if (!all.length) return h("p", { class: "muted no-data" }, `${title}: no data yet`);
  const W = 720, H = 240, L = 48, B = 28, T = 18, R = 12;
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const y1 = Math.max(0.5, ...all.map((p) => p[1]));
  const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
  const y = (v) => H - B - (v / y1) * (H - B - T);
  const svg = h("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "plot",
                         "data-title": title },
    h("text", { x: L, y: 12 }, title),
    h("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#8a94a6" }),
    h("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#8a94a6" }),
    [0, 0.5, 1].map((f) => h("text", { x: 4, y: y(f * y1) + 4 }, num(f * y1, 2))),
    h("text", { x: L, y: H - 8 }, ts(t0)), h("text", { x: W - R - 130, y: H - 8 }, ts(t1)),
    h("text", { x: 4, y: T - 4 }, yLabel),
    series.map((s, i) => h("g", { class: "series", "data-name": s.name },
      h("polyline", { fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2,
        points: s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }),
      s.points.map((p) => h("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5,
                                        fill: COLORS[i % COLORS.length] })))));
  const legend = h("div", { class: "legend" }, series.map((s, i) => {
    const sw = h("i", {});
    sw.style.background = COLORS[i % COLORS.length];
    return h("span", {}, sw, s.name);
  }));
  return h("div", {}, svg, legend);
}

function driftPlot(windows, by) {
  const groups = {};
  for (const w of windows) {
    const key = by === "device" ? `${w.model} v${w.version}` : w.device_id;
    (groups[key] = groups[key] || []).push([w.end, w.score]);
  }
  return lines(Object.entries(groups).map(([name, points]) => ({ name, points })),
               { title: "drift score per window", yLabel: "score" });
}

function featurePlot(windows) {
  const totals = {};
  for (const w of windows) for (const [f, v] of Object.entries(w.feature_psi || {}))
    totals[f] = Math.max(totals[f] || 0, v);
  const top = Object.entries(totals).sort((a, b) => b[1] - a[1]).slice(0, 6).map((e) => e[0]);
  return lines(top.map((f) => ({ name: f, points: windows.filter((w) => f in (w.feature_psi || {}))
    .map((w) => [w.end, w.feature_psi[f]]) })), { title: "PSI of the most drifted features",
                                                 yLabel: "PSI" });
}

pages.drift = async () => {
  const hours = Number(new URLSearchParams(location.hash.split("?")[1] || "").get("hours") || 24);
  const doc = await get(`drift?hours=${hours}`);
  const windows = doc.windows || [];
  const models = [...new Set(windows.map((w) => w.model))];
  schedule(10000);
  return [h("h1", {}, `Drift over the last ${hours} hours`),
    models.length ? models.map((m) => {
      const mine = windows.filter((w) => w.model === m);
      return h("div", { class: "card drift", "data-model": m }, h("h2", {}, m),
        driftPlot(mine, "model"), featurePlot(mine));
    }) : h("p", { class: "muted no-data" }, "no drift windows in this range"),
    (doc.days || []).length ? [h("h2", {}, "Daily roll-ups (past retention)"),
      table(["day", "device", "model", "windows", "drifted", "mean", "max"], doc.days.map((d) =>
        [d.day, d.device_id, `${d.model} v${d.version}`, d.windows, d.drifted,
         num(d.mean_score), num(d.max_score)]))] : null];
};

pages.jobs = async () => {
  const doc = await get("jobs");
  return [h("h1", {}, "Retraining jobs"),
    table(["job", "model", "version", "state", "created", "finished", "reason", "detail"],
      (doc.jobs || []).map((j) => [j.id, j.model, j.version, pill(j.state), ts(j.created_at),
        ts(j.finished_at), j.reason, j.detail || "-"])),
    h("h2", {}, "Labelled samples from devices"),
    table(["model", "region", "rows", "unused", "devices", "refused"], (doc.samples || []).map((s) =>
      [s.model, s.region, s.stored, s.unused, s.devices,
       Object.entries(s.refused || {}).map(([k, n]) => `${n} (${k})`).join(", ") || "-"]))];
};

pages.audit = async () => {
  const doc = await get("audit");
  const v = doc.verification || {};
  return [h("h1", {}, "Audit log"),
    h("p", { class: "verify" }, "hash chain: ", pill(v.ok ? "ok" : "bad"),
      v.ok ? ` ${v.entries} entries intact` : ` broken at ${v.first_bad_seq}: ${v.reason}`),
    table(["seq", "time", "actor", "role", "action", "target", "outcome", "detail"],
      (doc.events || []).map((e) => [e.seq, ts(e.time), e.actor, e.role || "-", e.action,
        e.target, pill(e.outcome === "allowed" ? "ok" : e.outcome === "denied" ? "bad" : e.outcome),
        e.detail]))];
};

// --- routing -----------------------------------------------------------------------------
function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(route, ms);
}

async function route() {
  clearTimeout(timer);
  const [path] = location.hash.replace(/^#\//, "").split("?");
  const [page, arg] = path.split("/");
  const name = pages[page] ? page : "fleet";
  document.querySelectorAll("header nav a").forEach((a) =>
    a.classList.toggle("current", a.dataset.page === name));
  try {
    const content = await pages[name](arg && decodeURIComponent(arg));
    main.replaceChildren(...[content].flat(2).filter(Boolean));
    main.dataset.page = name;
    statusLine.textContent = `updated ${new Date().toISOString().replace(/\.\d+Z/, "Z")}`;
  } catch (err) {
    main.replaceChildren(h("p", { class: "error" }, String(err.message || err)));
  }
}

window.addEventListener("hashchange", route);
(async () => {
  try {
    session = await get("session");
    document.getElementById("who").textContent = `${session.operator} (${session.role})`;
  } catch (err) {
    document.getElementById("who").textContent = "no session";
  }
  route();
})();
