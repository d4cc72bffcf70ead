// LoRAShear job dashboard (issue 8): plain JavaScript, no build step, no CDN. Talks only to the job API (/v1),
// with the API key typed into the page (kept in this tab's sessionStorage). Server data is put in the page with
// textContent / SVG attributes only, never as HTML.
"use strict";

const STAGES = ["load", "discover", "analyze", "prune", "compress", "recover", "evaluate", "export"];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#1098ad", "#f08c00", "#495057"];
const SVGNS = "http://www.w3.org/2000/svg";

const state = { key: sessionStorage.getItem("lorashear.key") || "", abort: null, timers: [] };

// -- DOM and HTTP helpers -------------------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function authHeaders(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || "HTTP " + status);
    this.status = status;
    this.code = e.code || "http_" + status;
    this.field = e.field || null;
  }
}

async function api(path, opts) {
  opts = opts || {};
  const r = await fetch(path, Object.assign({}, opts, { headers: authHeaders(opts.headers) }));
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    throw new ApiError(r.status, body);
  }
  return r;
}

const apiJSON = async (path, opts) => (await api(path, opts)).json();
const fmt = (x, d) => (x === null || x === undefined || Number.isNaN(x) ? "-" : Number(x).toFixed(d === undefined ? 2 : d));
const pct = (x) => (x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%");

function clearTimers() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  if (state.abort) state.abort.abort();
  state.abort = null;
}

function showError(where, err) {
  const msg = err instanceof ApiError ? `${err.code}: ${err.message}` : String(err);
  where.replaceChildren(el("p", { class: "error", role: "alert" }, msg));
  if (err instanceof ApiError && err.status === 401) where.append(el("p", { class: "hint" }, "Enter your API key above."));
}

// -- charts (SVG) ---------------------------------------------------------------------------------------------------
function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
  const mult = [1, 2, 5, 10].find((m) => (hi - lo) / (step * m) <= n) || 10;
  const s = step * mult;
  const out = [];
  for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-9; v += s) out.push(Number(v.toPrecision(6)));
  return out;
}

// series: [{name, points: [[x, y], ...]}]
function lineChart(node, series, opt) {
  opt = opt || {};
  const W = 560, H = 240, L = 48, R = 12, T = 18, B = 34;
  node.replaceChildren();
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pts = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  if (!pts.length) {
    node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opt.empty || "no data yet"));
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (opt.ymin !== undefined) y0 = Math.min(y0, opt.ymin);
  if (opt.ymax !== undefined) y1 = Math.max(y1, opt.ymax);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  node.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#98a2b3" }));
  node.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#98a2b3" }));
  for (const v of ticks(x0, x1, 6)) node.append(svg("text", { x: sx(v), y: H - B + 13, "text-anchor": "middle" }, v));
  for (const v of ticks(y0, y1, 5)) {
    node.append(svg("line", { x1: L, y1: sy(v), x2: W - R, y2: sy(v), stroke: "#eaecf0" }));
    node.append(svg("text", { x: L - 4, y: sy(v) + 3, "text-anchor": "end" }, v));
  }
  if (opt.xlabel) node.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, opt.xlabel));
  if (opt.ylabel) node.append(svg("text", { x: 4, y: 10, "text-anchor": "start" }, opt.ylabel));
  (opt.marks || []).forEach((x) =>
    node.append(svg("line", { x1: sx(x), y1: T, x2: sx(x), y2: H - B, stroke: "#adb5bd", "stroke-dasharray": "2 3" })));
  series.forEach((s, i) => {
    const good = s.points.filter((p) => Number.isFinite(p[1]));
    if (!good.length) return;
    const d = good.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
    const path = svg("path", { d, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.6, class: "series" });
    path.append(svg("title", {}, s.name));
    node.append(path);
    if (opt.dots || good.length === 1) good.forEach((p) => node.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: COLORS[i % COLORS.length] })));
  });
}

function legend(node, names) {
  node.replaceChildren(...names.map((n, i) => el("span", {}, el("i", { style: `background:${COLORS[i % COLORS.length]}` }), n)));
}

function magma(t) { // a perceptual dark-to-light ramp (black, purple, orange, light yellow)
  const stops = [[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]];
  t = Math.max(0, Math.min(1, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i;
  const c = stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function heatmap(node, layerMap) {
  const W = 560, H = 120, L = 64, T = 8, B = 24, R = 60;
  node.replaceChildren();
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!layerMap || !layerMap.length) {
    node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "the analysis has not run yet"));
    return;
  }
  const n = Math.max(...layerMap.map((r) => r.layer)) + 1;
  const vals = layerMap.map((r) => r.deviation);
  const lo = Math.min(...vals), hi = Math.max(...vals);
  const cw = (W - L - R) / n, ch = (H - T - B) / 2;
  layerMap.forEach((r) => {
    const row = r.node_group === "attention" ? 0 : 1;
    const rect = svg("rect", {
      x: L + r.layer * cw, y: T + row * ch, width: cw + 0.5, height: ch + 0.5, class: "cell",
      fill: magma(hi > lo ? (r.deviation - lo) / (hi - lo) : 0.5),
    });
    rect.append(svg("title", {}, `layer ${r.layer} ${r.node_group}: +${fmt(r.deviation, 4)} nats when ablated`));
    node.append(rect);
  });
  node.append(svg("text", { x: L - 6, y: T + ch / 2 + 3, "text-anchor": "end" }, "attention"));
  node.append(svg("text", { x: L - 6, y: T + 1.5 * ch + 3, "text-anchor": "end" }, "MLP"));
  for (const v of ticks(0, n - 1, 10).filter(Number.isInteger)) node.append(svg("text", { x: L + (v + 0.5) * cw, y: H - B + 13, "text-anchor": "middle" }, v));
  node.append(svg("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle" }, "layer"));
  for (let k = 0; k < 20; k++) node.append(svg("rect", { x: W - R + 12, y: T + (19 - k) * (H - T - B) / 20, width: 10, height: (H - T - B) / 20 + 0.5, fill: magma(k / 19) }));
  node.append(svg("text", { x: W - R + 26, y: T + 8 }, fmt(hi, 3)));
  node.append(svg("text", { x: W - R + 26, y: H - B }, fmt(lo, 3)));
}

function widths(node, quotas, nLayers) { // per-layer lists (per_layer layout) or one value for every layer (uniform)
  const kept = (quotas && quotas.kept) || null;
  if (!kept) { lineChart(node, [], { empty: "the quotas are not planned yet" }); return; }
  const n = Math.max(...["num_attention_heads", "num_key_value_heads", "intermediate_size"].map((k) => (Array.isArray(kept[k]) ? kept[k].length : 0)), (quotas.layers || []).length, nLayers || 1);
  const per = (k) => (Array.isArray(kept[k]) ? kept[k] : Array(n).fill(kept[k]));
  const series = [
    ["attention heads", per("num_attention_heads")],
    ["KV heads", per("num_key_value_heads")],
    ["MLP channels / 100", per("intermediate_size").map((v) => v / 100)],
  ].filter(([, v]) => v.every((x) => x !== undefined));
  lineChart(node, series.map(([name, v]) => ({ name, points: v.map((y, i) => [i, y]) })), { xlabel: "layer", ylabel: "kept per layer", ymin: 0, dots: true });
  return series.map(([name]) => name);
}

// -- views ----------------------------------------------------------------------------------------------------------
async function listView(root, status, after) {
  const filters = el("p", { class: "filters" }, ...[null, ...STATUSES].map((s) =>
    el("a", { href: s ? `#/?status=${s}` : "#/", class: s === status ? "on" : null }, s || "all")));
  const body = el("tbody", {});
  const table = el("table", { id: "jobs" },
    el("thead", {}, el("tr", {}, ...["job", "status", "stage", "progress", "model", "removed", "ppl dense → recovered", "created"].map((h) => el("th", {}, h)))), body);
  const msg = el("div", {});
  const pager = el("p", { class: "filters" });
  root.replaceChildren(el("h2", {}, "Jobs"), filters, msg, table, pager);
  async function load() {
    try {
      const q = new URLSearchParams({ limit: "50" });
      if (status) q.set("status", status);
      if (after) q.set("after", after);
      const page = await apiJSON("/v1/jobs?" + q.toString());
      const here = new URLSearchParams(status ? { status } : {});
      const next = new URLSearchParams(here);
      if (page.next_cursor) next.set("after", page.next_cursor);
      pager.replaceChildren(
        after ? el("a", { href: "#/?" + here.toString(), id: "first-page" }, "« newest") : "",
        page.has_more ? el("a", { href: "#/?" + next.toString(), id: "next-page" }, "older »") : "");
      msg.replaceChildren(page.data.length ? "" : el("p", { class: "hint" }, "No jobs yet: submit one."));
      body.replaceChildren(...page.data.map((j) => {
        const s = j.summary || {};
        return el("tr", { "data-job": j.id },
          el("td", {}, el("a", { href: "#/jobs/" + j.id }, j.id)),
          el("td", {}, el("span", { class: "status " + j.status }, j.status)),
          el("td", {}, j.stage || "-"),
          el("td", { class: "num" }, pct(j.progress.fraction)),
          el("td", {}, (j.spec && j.spec.model) || "-"),
          el("td", { class: "num" }, pct(s.compression_ratio)),
          el("td", { class: "num" }, s.ppl_dense ? `${fmt(s.ppl_dense)} → ${fmt(s.ppl_recovered)}` : "-"),
          el("td", {}, new Date(j.created_at).toLocaleString()));
      }));
    } catch (err) { showError(msg, err); }
  }
  await load();
  state.timers.push(setInterval(load, 3000));
}

function stageRows() {
  return STAGES.map((s) => {
    const bar = el("progress", { max: 1, value: 0, id: "stage-" + s });
    return el("div", { class: "stage" }, el("span", {}, s), bar, el("span", { id: "stage-" + s + "-text", class: "hint" }, "waiting"));
  });
}

function setStage(stage, step, total, text) {
  const bar = document.getElementById("stage-" + stage);
  if (!bar) return;
  bar.max = Math.max(total, 1);
  bar.value = total ? Math.min(step, total) : bar.max;
  document.getElementById("stage-" + stage + "-text").textContent = text;
}

async function* sseEvents(path, signal) { // Server-Sent Events over fetch, so the API key travels in a header
  let after = 0;
  for (let attempt = 0; attempt < 20 && !signal.aborted; attempt++) {
    let r;
    try {
      r = await api(`${path}?stream=true&after=${after}`, { headers: { Accept: "text/event-stream" }, signal });
    } catch (err) {
      if (signal.aborted || err instanceof ApiError) throw err;
      await new Promise((res) => setTimeout(res, 1000));
      continue;
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, cut); buf = buf.slice(cut + 2);
          let name = "message", data = [], id = null;
          for (const line of frame.split("\n")) {
            if (line.startsWith(":")) continue;
            const i = line.indexOf(":"), k = i < 0 ? line : line.slice(0, i);
            let v = i < 0 ? "" : line.slice(i + 1); if (v.startsWith(" ")) v = v.slice(1);
            if (k === "event") name = v; else if (k === "data") data.push(v); else if (k === "id") id = Number(v);
          }
          if (!data.length) continue;
          if (name === "end") return;
          if (id !== null) after = Math.max(after, id);
          yield JSON.parse(data.join("\n"));
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    await new Promise((res) => setTimeout(res, 500)); // dropped: resume after the last id
  }
}

async function jobView(root, id) {
  const head = el("div", {});
  const msg = el("div", {});
  const panels = {
    heat: svg("svg", { id: "heatmap", role: "img", "aria-label": "sensitivity map" }),
    widths: svg("svg", { id: "widths", role: "img", "aria-label": "kept widths per layer" }),
    losses: svg("svg", { id: "losses", role: "img", "aria-label": "loss curves" }),
    weights: svg("svg", { id: "weights", role: "img", "aria-label": "recovery mix weights" }),
  };
  const legends = { widths: el("div", { class: "legend" }), losses: el("div", { class: "legend" }), weights: el("div", { class: "legend" }) };
  const tables = el("div", { id: "tables" });
  const arts = el("div", { id: "artifacts" });
  root.replaceChildren(head, msg,
    el("h3", {}, "Stages"), el("div", { id: "stages" }, stageRows()),
    el("div", { class: "grid" },
      el("div", { class: "panel" }, el("h3", {}, "Sensitivity map (loss increase when ablated, nats)"), panels.heat),
      el("div", { class: "panel" }, el("h3", {}, "Kept heads / KV heads / channels per layer"), panels.widths, legends.widths),
      el("div", { class: "panel" }, el("h3", {}, "Loss curves (nats/token)"), panels.losses, legends.losses),
      el("div", { class: "panel" }, el("h3", {}, "Recovery mix weights per round"), panels.weights, legends.weights)),
    tables, el("h3", {}, "Artifacts"), arts);
  heatmap(panels.heat, null);
  widths(panels.widths, null);
  lineChart(panels.losses, []);
  lineChart(panels.weights, [], { empty: "no recovery round yet" });

  let job;
  try { job = await apiJSON("/v1/jobs/" + encodeURIComponent(id)); } catch (err) { showError(msg, err); return; }
  const renderHead = (j) => {
    const cancel = j.status === "queued" || j.status === "running"
      ? el("button", { id: "cancel", onclick: async () => { try { renderHead(await apiJSON(`/v1/jobs/${j.id}/cancel`, { method: "POST" })); } catch (err) { showError(msg, err); } } }, "Cancel")
      : "";
    const err = j.error ? el("p", { class: "error" }, `${j.error.code} (${j.error.type || "-"}): ${j.error.message}`) : "";
    head.replaceChildren(el("h2", {}, j.id, " ", el("span", { class: "status " + j.status, id: "job-status" }, j.status)),
      el("p", {}, `model ${j.spec.model}, target ${pct(j.spec.target_ratio)}, attempt ${j.attempt}, `,
        el("span", { id: "overall" }, `${pct(j.progress.fraction)} done`), " ", cancel), err);
  };
  renderHead(job);

  let lastMetrics = 0;
  const drawMetrics = async () => {
    lastMetrics = Date.now();
    let m;
    try { m = await apiJSON(`/v1/jobs/${id}/metrics`); } catch (err) { return; }
    const lh = (m["lhspg/loss"] || []).map((p) => [p.step, p.value]);
    const offset = lh.length ? Math.max(...lh.map((p) => p[0])) : 0;
    const rc = (m["recovery/loss"] || []).map((p) => [offset + p.step, p.value]);
    lineChart(panels.losses, [{ name: "LHSPG", points: lh }, { name: "recovery", points: rc }], { xlabel: "optimizer step", ylabel: "loss" });
    legend(legends.losses, ["LHSPG", "recovery"]);
    const names = Object.keys(m).filter((k) => k.startsWith("recovery/weight/"));
    lineChart(panels.weights, names.map((k) => ({ name: k.slice(16), points: m[k].map((p, i) => [i + 1, p.value]) })),
      { xlabel: "round", ylabel: "weight", ymin: 0, ymax: 1, dots: true, empty: "no recovery round yet" });
    legend(legends.weights, names.map((k) => k.slice(16)));
  };
  let nLayers = 0, lastQuotas = null;
  const drawHeat = (map) => {
    heatmap(panels.heat, map);
    nLayers = Math.max(nLayers, ...map.map((r) => r.layer + 1));
    if (lastQuotas) drawWidths(lastQuotas);
  };
  const drawWidths = (q, layers) => {
    lastQuotas = q;
    nLayers = Math.max(nLayers, layers || 0);
    legend(legends.widths, widths(panels.widths, q, nLayers) || []);
  };

  const finish = async () => {
    job = await apiJSON("/v1/jobs/" + encodeURIComponent(id));
    renderHead(job);
    await drawMetrics();
    await drawResults(job, tables, arts, drawHeat, drawWidths, msg);
  };

  if (job.status === "succeeded" || job.status === "failed" || job.status === "cancelled") {
    // replay the stored events for the stage bars, then the final figures
    for await (const ev of storedEvents(id)) onEvent(ev);
    await finish();
    return;
  }
  state.abort = new AbortController();
  state.timers.push(setInterval(async () => { // status, attempt and overall fraction between events
    try { job = await apiJSON("/v1/jobs/" + encodeURIComponent(id)); renderHead(job); } catch (err) { /* keep the last */ }
  }, 3000));
  function onEvent(ev) {
    if (ev.kind === "stage_start" || ev.kind === "progress" || ev.kind === "stage_end") {
      const done = ev.kind === "stage_end";
      setStage(ev.stage, done ? ev.total || 1 : ev.step, done ? ev.total || 1 : ev.total, done ? "done" : `${ev.step} / ${ev.total || "?"}`);
    }
    if (ev.data && ev.data.layer_map) drawHeat(ev.data.layer_map);
    if (ev.data && ev.data.quotas) drawWidths(ev.data.quotas);
  }
  try {
    for await (const ev of sseEvents(`/v1/jobs/${id}/events`, state.abort.signal)) {
      onEvent(ev);
      const overall = document.getElementById("overall");
      if (overall) overall.textContent = `${ev.stage}: step ${ev.step}`;
      if ((ev.stage === "prune" || ev.stage === "recover") && Date.now() - lastMetrics > 1500) drawMetrics();
    }
  } catch (err) {
    if (!state.abort || !state.abort.signal.aborted) showError(msg, err);
    return;
  }
  if (state.abort && !state.abort.signal.aborted) await finish();

  async function* storedEvents(jobId) {
    let after = 0;
    for (;;) {
      const page = await apiJSON(`/v1/jobs/${jobId}/events?after=${after}&limit=1000`);
      for (const ev of page.data) { after = ev.id; yield ev; }
      if (!page.has_more) return;
    }
  }
}

async function drawResults(job, tables, arts, drawHeat, drawWidths, msg) {
  let list = [];
  try { list = (await apiJSON(`/v1/jobs/${job.id}/artifacts`)).data; } catch (err) { showError(msg, err); }
  arts.replaceChildren(list.length
    ? el("table", {}, el("tbody", {}, ...list.map((a) => el("tr", {},
      el("td", {}, a.name), el("td", {}, a.kind), el("td", { class: "num" }, (a.size / 1e6).toFixed(2) + " MB"),
      el("td", {}, el("code", { title: "SHA-256" }, a.sha256.slice(0, 16) + "…")),
      el("td", {}, el("button", { class: "download", "data-artifact": a.name, onclick: () => download(a, msg) }, "Download"))))))
    : el("p", { class: "hint" }, "No artifacts (the job has not succeeded)."));
  const s = job.summary || {};
  const rows = [];
  if (s.ppl_dense) {
    rows.push(el("h3", {}, "Perplexity"), el("table", { id: "ppl" },
      el("thead", {}, el("tr", {}, ...["dense", "pruned", "recovered", "removed", "max |logit diff| (slicing)"].map((h) => el("th", { class: "num" }, h)))),
      el("tbody", {}, el("tr", {}, el("td", { class: "num" }, fmt(s.ppl_dense)), el("td", { class: "num" }, fmt(s.ppl_pruned)),
        el("td", { class: "num" }, fmt(s.ppl_recovered)), el("td", { class: "num" }, pct(s.compression_ratio)),
        el("td", { class: "num" }, Number(s.max_abs_logit_diff).toExponential(1))))));
  }
  const report = list.find((a) => a.name === "report");
  if (report) {
    try {
      const r = await apiJSON(report.download_url);
      if (r.analysis && r.analysis.layer_map) drawHeat(r.analysis.layer_map);
      if (r.quotas) drawWidths(r.quotas, ((r.model || {}).shape || {}).num_layers);
      if (r.zeroshot) {
        const zs = r.zeroshot, tasks = Object.keys(zs.final.tasks);
        rows.push(el("h3", {}, "Zero-shot accuracy (lm-eval)"), el("table", { id: "zeroshot" },
          el("thead", {}, el("tr", {}, el("th", {}, "task"), el("th", { class: "num" }, "n"), el("th", { class: "num" }, "dense"), el("th", { class: "num" }, "final"))),
          el("tbody", {}, ...tasks.map((t) => el("tr", {}, el("td", {}, zs.final.tasks[t].label || t), el("td", { class: "num" }, zs.final.tasks[t].n),
            el("td", { class: "num" }, fmt((zs.dense.tasks[t] || {}).score, 3)), el("td", { class: "num" }, fmt(zs.final.tasks[t].score, 3)))),
          el("tr", {}, el("td", {}, "avg5"), el("td", {}), el("td", { class: "num" }, fmt(zs.dense.avg5, 3)), el("td", { class: "num" }, fmt(zs.final.avg5, 3))))));
        const pd = zs.paired;
        if (pd) { // the change on the same documents, with its paired standard error (points)
          const key = pd.avg5 != null ? "avg5" : "avg";
          rows.push(el("p", { id: "zeroshot-paired" }, `Change on the same documents: ${key} ${(100 * pd[key]).toFixed(1)} ± ${(100 * pd[key + "_se"]).toFixed(1)} points (paired standard error).`));
        }
      }
      if (r.speed && r.speed.comparison) {
        rows.push(el("h3", {}, "Speed (tokens/s, median)"), el("table", { id: "speed" },
          el("thead", {}, el("tr", {}, ...["batch", "phase", "dense", "final", "speedup", "ideal"].map((h) => el("th", { class: "num" }, h)))),
          el("tbody", {}, ...r.speed.comparison.rows.flatMap((row) => ["prefill", "decode"].map((ph) => el("tr", {},
            el("td", { class: "num" }, row.batch), el("td", { class: "num" }, ph), el("td", { class: "num" }, fmt(row[ph].dense_tokens_per_s, 1)),
            el("td", { class: "num" }, fmt(row[ph].final_tokens_per_s, 1)), el("td", { class: "num" }, fmt(row[ph].speedup) + "x"),
            el("td", { class: "num" }, fmt(row[ph].ideal_speedup) + "x")))))));
      }
    } catch (err) { showError(msg, err); }
  }
  tables.replaceChildren(...rows);
}

async function download(a, msg) { // fetch with the key, then hand the bytes to the browser
  try {
    const r = await api(a.download_url, { headers: { Accept: "*/*" } });
    const blob = await r.blob();
    const disp = r.headers.get("Content-Disposition") || "";
    const name = (disp.match(/filename="([^"]+)"/) || [null, a.name])[1];
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link); link.click(); link.remove();
  } catch (err) { showError(msg, err); }
}

async function newView(root) {
  const models = el("datalist", { id: "model-names" });
  const model = el("input", { id: "f-model", name: "model", list: "model-names", required: "", value: "stories260K" });
  const ratio = el("input", { id: "f-target_ratio", name: "target_ratio", type: "number", step: "any", value: "0.2" });
  const extra = el("textarea", { id: "f-extra", name: "extra", spellcheck: "false" });
  extra.value = JSON.stringify({ lhspg: { warmup_steps: 2, periods: 2, period_steps: 3, batch_size: 4, seq_len: 64 },
    recovery: { rounds: 1, steps_per_round: 3, batch_size: 4, seq_len: 64 } }, null, 2);
  const errs = { model: el("span", { class: "field-error", id: "err-model" }), target_ratio: el("span", { class: "field-error", id: "err-target_ratio" }),
    extra: el("span", { class: "field-error", id: "err-extra" }) };
  const status = el("div", {});
  const form = el("form", { class: "spec", id: "submit-form" },
    el("label", { for: "f-model" }, "Model (a name under the model root)"), model, errs.model,
    el("label", { for: "f-target_ratio" }, "Target ratio (fraction of parameters to remove)"), ratio, errs.target_ratio,
    el("label", { for: "f-extra" }, "Other sections (JSON: lora, structures, analysis, lhspg, recovery, data, evaluation, export, runtime)"),
    extra, errs.extra, el("p", {}, el("button", { type: "submit", id: "submit" }, "Submit job")), status);
  root.replaceChildren(el("h2", {}, "Submit a job"), el("p", { class: "hint" }, "Every field is described in the API docs (/docs, JobSpecIn)."), models, form);
  apiJSON("/v1/models").then((d) => models.replaceChildren(...d.data.filter((e) => e.kind !== "adapter").map((e) => el("option", { value: e.name }))), () => {});
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    Object.values(errs).forEach((n) => (n.textContent = ""));
    let spec;
    try { spec = extra.value.trim() ? JSON.parse(extra.value) : {}; } catch (err) { errs.extra.textContent = "not valid JSON: " + err.message; return; }
    if (typeof spec !== "object" || Array.isArray(spec) || spec === null) { errs.extra.textContent = "must be a JSON object"; return; }
    spec.model = model.value.trim();
    spec.target_ratio = Number(ratio.value);
    const key = (crypto.randomUUID && crypto.randomUUID()) || String(Date.now()) + Math.random();
    try {
      const job = await apiJSON("/v1/jobs", { method: "POST", body: JSON.stringify(spec), headers: { "Content-Type": "application/json", "Idempotency-Key": key } });
      location.hash = "#/jobs/" + job.id;
    } catch (err) {
      if (err instanceof ApiError && err.field) {
        const top = err.field.split(/[.[]/)[0];
        const slot = errs[top] || errs.extra;
        slot.textContent = `${err.field}: ${err.message}`;
        slot.setAttribute("role", "alert");
      } else showError(status, err);
    }
  });
}

// -- routing ----------------------------------------------------------------------------------------------------------
async function route() {
  clearTimers();
  const root = document.getElementById("view");
  const hash = location.hash || "#/";
  const job = hash.match(/^#\/jobs\/([A-Za-z0-9_-]+)$/);
  if (job) return jobView(root, job[1]);
  if (hash === "#/new") return newView(root);
  const q = new URLSearchParams(hash.split("?")[1] || "");
  return listView(root, STATUSES.includes(q.get("status")) ? q.get("status") : null, q.get("after"));
}

document.getElementById("api-key").value = state.key;
document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = document.getElementById("api-key").value.trim();
  sessionStorage.setItem("lorashear.key", state.key);
  route();
});
window.addEventListener("hashchange", route);
route();
