// The race view: races, one race's curves with fits and 95% bands, its trials and decisions.
// Plain browser JavaScript, no library, no network beyond this origin. Live: server-sent
// events say what changed in the ledger; the page fetches only what it shows.
"use strict";

const STATE_COLOURS = {
  LEADING: "var(--leading)", TIED: "var(--tied)", CATCHING_UP: "var(--catching)",
  PARALLEL_LOSING: "var(--parallel)", DIVERGING: "var(--diverging)", UNKNOWN: "var(--unknown)",
};
const REFRESH_MS = 1000;     // curves and table refresh at most this often while samples flow
const TABLE_FIRST = 60;      // table rows drawn with the first paint; the rest follow
const TABLE_CHUNK = 250;
const SVG_NS = "http://www.w3.org/2000/svg";

const view = {
  races: [], race: null, detail: null, curves: null, decisions: new Map(),
  marks: null, painted: false, firstPaintMs: null, busy: false, dirty: false, lastFetch: 0,
  timer: null, highlighted: null, sort: { key: "rank", dir: 1 }, tableGeneration: 0,
  renderMs: 0, shapes: new Map(),
};
window.__view = view;

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => (
  { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const fmt = (x, d = 4) => (x === null || x === undefined ? "" : Number(x).toFixed(d));
const colour = (state) => STATE_COLOURS[state] || STATE_COLOURS.UNKNOWN;

class Unauthorised extends Error {}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) throw new Unauthorised(path);
  if (!r.ok) {
    let msg = `${r.status}`;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${msg}`);
  }
  return r.json();
}

// ---------------------------------------------------------------------------------------
// Token

function askToken(refused) {
  const dlg = $("token-dialog");
  $("token-error").hidden = !refused;
  if (!dlg.open) dlg.showModal();
}

$("token-form").addEventListener("submit", () => {
  const token = $("token-input").value;
  document.cookie = `gardener_view_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
  start();
});

function hasTokenCookie() {
  return document.cookie.split(";").some((c) => c.trim().startsWith("gardener_view_token="));
}

// ---------------------------------------------------------------------------------------
// Races

function selectedFromHash() {
  const m = location.hash.match(/race=([^&]+)/);
  return m ? decodeURIComponent(m[1]) : null;
}

async function loadRaces() {
  const body = await api("/api/races");
  view.races = body.races;
  $("scope").textContent = body.account ? `account ${body.account}` : "every account";
  renderRaces();
  if (!view.race && view.races.length) {
    const wanted = selectedFromHash();
    const pick = view.races.find((r) => r.name === wanted) || view.races[0];
    selectRace(pick.name);
  }
}

function renderRaces() {
  const nav = $("races");
  if (!view.races.length && view.race) return;  // the list has not arrived yet
  if (!view.races.length) { nav.innerHTML = '<p class="muted">No races yet.</p>'; return; }
  nav.innerHTML = view.races.map((r) => `
    <a href="#race=${encodeURIComponent(r.name)}" data-race="${esc(r.name)}"
       class="${r.name === view.race ? "selected" : ""}">
      <div class="name">${esc(r.name)}</div>
      <div class="sub"><span class="badge ${esc(r.status)}">${esc(r.status)}</span>
        ${esc(r.kind)} · ${esc(r.account)} · ${r.live}/${r.trials} live · ${r.decisions} decisions</div>
    </a>`).join("");
}

$("races").addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-race]");
  if (!a) return;
  ev.preventDefault();
  selectRace(a.dataset.race);
});

function selectRace(name) {
  if (view.race === name) return;
  view.race = name;
  view.detail = null; view.curves = null; view.decisions = new Map();
  history.replaceState(null, "", `#race=${encodeURIComponent(name)}`);
  renderRaces();
  $("decisions").innerHTML = "";
  refreshRace(true);
}

// ---------------------------------------------------------------------------------------
// One race: fetch, throttled

function scheduleRefresh() {
  if (view.timer) return;
  // A big race renders slowly: refresh it less often, so the page stays responsive.
  const every = Math.max(REFRESH_MS, 3 * view.renderMs);
  const wait = Math.max(0, every - (performance.now() - view.lastFetch));
  view.timer = setTimeout(() => { view.timer = null; refreshRace(false); }, wait);
}

async function refreshRace(first) {
  if (!view.race) return;
  if (view.busy) { view.dirty = true; return; }
  view.busy = true; view.dirty = false; view.lastFetch = performance.now();
  const name = view.race;
  const q = encodeURIComponent(name);
  try {
    const [detail, curves, decisions] = await Promise.all([
      api(`/api/races/${q}`), api(`/api/races/${q}/curves`), api(`/api/races/${q}/decisions`),
    ]);
    if (name !== view.race) return;
    if (!view.painted) performance.mark("race-data");
    view.detail = detail; view.curves = curves;
    mergeDecisions(decisions.decisions, !first);
    const began = performance.now();
    renderRace();
    view.renderMs = performance.now() - began;
    if (!view.painted) {
      performance.mark("race-dom");
      view.painted = true;
      // Painted once the frame holding the race has been drawn, not when the DOM was built.
      requestAnimationFrame(() => setTimeout(() => {
        view.firstPaintMs = performance.now();
        document.body.dataset.painted = "1";
      }, 0));
    }
  } catch (err) {
    if (err instanceof Unauthorised) { askToken(true); return; }
    $("race-head").innerHTML = `<p class="error">${esc(err.message)}</p>`;
  } finally {
    view.busy = false;
    if (view.dirty) scheduleRefresh();
  }
}

async function refreshDecisions() {
  if (!view.race) return;
  const name = view.race;
  try {
    const body = await api(`/api/races/${encodeURIComponent(name)}/decisions`);
    if (name === view.race) { mergeDecisions(body.decisions, true); renderDecisions(); }
  } catch (err) {
    if (err instanceof Unauthorised) askToken(true);
  }
}

function mergeDecisions(list, markNew) {
  for (const d of list) {
    if (!view.decisions.has(d.id)) { d._new = markNew; view.decisions.set(d.id, d); }
  }
}

// ---------------------------------------------------------------------------------------
// Rendering

function renderRace() {
  const d = view.detail;
  const r = d.race;
  const live = d.trials.filter((t) => t.desired_state === "running").length;
  $("race-head").innerHTML = `
    <h2>${esc(r.name)} <span class="badge ${esc(r.status)}">${esc(r.status)}</span></h2>
    <div class="facts">
      <span>account <b>${esc(r.account)}</b></span><span>kind <b>${esc(r.kind)}</b></span>
      <span>trials <b>${d.trials.length}</b> (${live} live)</span>
      <span>horizon <b>${r.horizon}</b></span>
      <span>rungs <b>${r.rungs.join(" · ")}</b></span>
      <span>band <b>${Math.round(r.level * 100)}% prediction</b></span>
    </div>`;
  renderLegend();
  renderChart();
  renderTrials();
  renderDecisions();
  renderTripwires();
}

function renderLegend() {
  const items = Object.entries(STATE_COLOURS).map(([k, c]) =>
    `<span><i style="background:${c}"></i>${k.toLowerCase().replace("_", " ")}</span>`);
  items.push('<span>solid: samples · dashed: fitted power law · shade: 95% band · ' +
             'faded: pruned · purple: rungs</span>');
  $("legend").innerHTML = items.join("");
}

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function niceTicks(lo, hi, n) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const step0 = span / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toFixed(10));
  return out;
}

function renderChart() {
  const box = $("chart");
  const curves = view.curves.curves;
  const rungs = view.curves.rungs;
  const W = Math.max(480, box.clientWidth || 900), H = 380;
  const M = { l: 52, r: 16, t: 14, b: 30 };
  let xmin = Infinity, ymin = Infinity, ymax = -Infinity;
  for (const c of curves) {
    const s = c.points.step, b = c.points.bpb;
    for (let i = 0; i < s.length; i++) {
      if (s[i] > 0 && s[i] < xmin) xmin = s[i];
      if (b[i] !== null) { if (b[i] < ymin) ymin = b[i]; if (b[i] > ymax) ymax = b[i]; }
    }
  }
  const xmax = Math.max(view.curves.horizon, ...rungs) * 1.05;
  if (!isFinite(xmin)) xmin = 1;
  xmin = Math.max(1, Math.min(xmin, rungs[0] || xmin) * 0.9);
  if (!isFinite(ymin)) { ymin = 0; ymax = 1; }
  // Let the bands widen the view a little, not without bound.
  const spread = Math.max(ymax - ymin, 0.01);
  for (const c of curves) {
    if (!c.band) continue;
    for (const v of c.band.low) if (v !== null) ymin = Math.min(ymin, Math.max(v, ymin - 0.25 * spread));
  }
  ymax += 0.03 * spread; ymin -= 0.03 * spread;
  const lx0 = Math.log(xmin), lx1 = Math.log(xmax);
  const X = (s) => M.l + (Math.log(Math.max(s, xmin)) - lx0) / (lx1 - lx0) * (W - M.l - M.r);
  const Y = (v) => M.t + (ymax - v) / (ymax - ymin) * (H - M.t - M.b);

  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                          "aria-label": `curves of ${view.curves.race}` });
  el("clipPath", { id: "plot" }, el("defs", {}, svg)).appendChild(
    el("rect", { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b }));
  const axes = el("g", { class: "axis" }, svg);
  for (const v of niceTicks(ymin, ymax, 6)) {
    el("line", { class: "grid", x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v) }, axes);
    el("text", { x: M.l - 6, y: Y(v) + 4, "text-anchor": "end" }, axes).textContent = v.toFixed(2);
  }
  for (let e = Math.ceil(Math.log10(xmin)); e <= Math.floor(Math.log10(xmax)); e++) {
    for (const m of [1, 2, 5]) {
      const s = m * Math.pow(10, e);
      if (s < xmin || s > xmax) continue;
      el("line", { class: "grid", x1: X(s), x2: X(s), y1: M.t, y2: H - M.b }, axes);
      el("text", { x: X(s), y: H - M.b + 14, "text-anchor": "middle" }, axes).textContent =
        s >= 1000 ? `${s / 1000}k` : `${s}`;
    }
  }
  el("text", { x: W - M.r, y: H - 4, "text-anchor": "end" }, axes).textContent = "step (log)";
  el("text", { x: 4, y: M.t + 4 }, axes).textContent = "BPB";
  el("line", { x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }, axes);
  el("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }, axes);

  const plot = el("g", { class: "plot", "clip-path": "url(#plot)" }, svg);
  rungs.forEach((s, i) => {
    el("line", { class: "rung", x1: X(s), x2: X(s), y1: M.t, y2: H - M.b, "data-step": s }, plot);
    const right = X(s) > W - M.r - 80;
    el("text", { class: "rung-label", x: X(s) + (right ? -3 : 3), y: M.t + 10,
                 "text-anchor": right ? "end" : "start" }, plot).textContent = `rung ${i} · ${s}`;
  });
  const pts = (xs, ys) => {
    const out = [];
    for (let i = 0; i < xs.length; i++) {
      if (ys[i] !== null) out.push(`${X(xs[i]).toFixed(1)},${Y(ys[i]).toFixed(1)}`);
    }
    return out;
  };
  // One path per kind (band, fit, curve), seed state and pruned-or-not, each trial one
  // subpath of it: a thousand trials are a few dozen elements, not three thousand. Bands go
  // under fits under curves, and the pruned under the live.
  const batches = new Map();
  const shapes = new Map();  // trial -> its own path data, for the highlight
  for (const c of curves) {
    const key = `${c.pruned ? "0" : "1"}|${c.seed_state || "UNKNOWN"}`;
    if (!batches.has(key)) {
      batches.set(key, { band: [], fit: [], curve: [], col: colour(c.seed_state), pruned: c.pruned });
    }
    const b = batches.get(key);
    const shape = { col: b.col };
    if (c.band) {
      const lo = pts(c.band.step, c.band.low), hi = pts(c.band.step, c.band.high).reverse();
      if (lo.length > 1 && hi.length > 1) {
        shape.band = `M${lo.join("L")}L${hi.join("L")}Z`;
        b.band.push(shape.band);
      }
      const mean = pts(c.band.step, c.band.mean);
      if (mean.length > 1) { shape.fit = `M${mean.join("L")}`; b.fit.push(shape.fit); }
    }
    const line = pts(c.points.step, c.points.bpb);
    if (line.length) { shape.curve = `M${line.join("L")}`; b.curve.push(shape.curve); }
    shapes.set(c.canon_name, shape);
  }
  const keys = [...batches.keys()].sort();
  for (const kind of ["band", "fit", "curve"]) {
    for (const key of keys) {
      const b = batches.get(key);
      if (!b[kind].length) continue;
      const paint = kind === "band" ? { fill: b.col } : { stroke: b.col };
      el("path", { class: `${kind}${b.pruned ? " pruned" : ""}`, d: b[kind].join(""),
                   "data-state": key.split("|")[1], ...paint }, plot);
    }
  }
  // The highlight lives in a second SVG laid over the first, so drawing it relays out
  // nothing of the thousand trials below.
  const over = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "overlay", "aria-hidden": "true" });
  el("clipPath", { id: "plot-top" }, el("defs", {}, over)).appendChild(
    el("rect", { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b }));
  const top = el("g", { class: "top", "clip-path": "url(#plot-top)" }, over);
  el("rect", { class: "veil", x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b,
               display: "none" }, top);
  view.shapes = shapes;
  box.replaceChildren(svg, over);
  if (view.highlighted) highlight(view.highlighted);
}

// Highlighting restyles nothing else: a veil dims every trial at once and a copy of the
// chosen one is drawn over it (a thousand trials stay responsive).
function highlight(name) {
  view.highlighted = name;
  const top = $("chart").querySelector("svg.overlay g.top");
  if (!top) return;
  top.querySelector("g.trial")?.remove();
  const shape = name ? view.shapes.get(name) : null;
  top.querySelector(".veil").setAttribute("display", shape ? "inline" : "none");
  if (!shape) return;
  const g = el("g", { class: "trial hl", "data-name": name }, top);
  if (shape.band) el("path", { class: "band", d: shape.band, fill: shape.col }, g);
  if (shape.fit) el("path", { class: "fit", d: shape.fit, stroke: shape.col }, g);
  if (shape.curve) el("path", { class: "curve", d: shape.curve, stroke: shape.col }, g);
}

const COLUMNS = [
  ["rank", "rank", true], ["canon_name", "trial", false], ["account", "account", false],
  ["state", "state", false], ["seed_state", "seed state", false],
  ["last_step", "last step", true], ["last_bpb", "last BPB", true],
  ["predicted", "predicted final (95%)", true],
];

function sortValue(t, key) {
  if (key === "predicted") return t.predicted_final ? t.predicted_final.mean : null;
  return t[key];
}

function renderTrials() {
  const trials = view.detail.trials.slice();
  const { key, dir } = view.sort;
  trials.sort((a, b) => {
    const va = sortValue(a, key), vb = sortValue(b, key);
    if (va === vb) return a.canon_name < b.canon_name ? -1 : 1;
    if (va === null || va === undefined) return 1;
    if (vb === null || vb === undefined) return -1;
    return (va < vb ? -1 : 1) * dir;
  });
  const head = "<thead><tr>" + COLUMNS.map(([k, label, num]) =>
    `<th data-key="${k}" class="${num ? "num" : ""}">${label}${k === key ? (dir > 0 ? " ▴" : " ▾") : ""}</th>`
  ).join("") + "</tr></thead>";
  const row = (t) => {
    const p = t.predicted_final;
    const pred = p ? `${fmt(p.mean)} <span class="muted">[${fmt(p.low)}, ${fmt(p.high)}]</span>`
      : `<span class="muted" title="${esc(t.fit.reason)}">no fit</span>`;
    return `<tr data-name="${esc(t.canon_name)}" class="${t.pruned ? "pruned" : ""}">
      <td class="num">${t.rank ?? ""}</td><td title="${esc(t.canon_name)}">${esc(t.canon_name)}</td>
      <td>${esc(t.account)}</td><td>${esc(t.state)}</td>
      <td><span class="dot" style="background:${colour(t.seed_state)}"></span>${esc(t.seed_state || "—")}</td>
      <td class="num">${t.last_step ?? ""}</td><td class="num">${fmt(t.last_bpb)}</td>
      <td class="num">${pred}</td></tr>`;
  };
  // The rows in view first; the rest in later tasks, so a thousand trials do not hold up
  // the first paint (a newer render cancels an older one's remainder).
  const generation = ++view.tableGeneration;
  $("trials").innerHTML = head + "<tbody>" + trials.slice(0, TABLE_FIRST).map(row).join("") +
    "</tbody>";
  const body = $("trials").tBodies[0];
  const more = (from) => {
    if (generation !== view.tableGeneration || from >= trials.length) return;
    body.insertAdjacentHTML("beforeend", trials.slice(from, from + TABLE_CHUNK).map(row).join(""));
    setTimeout(() => more(from + TABLE_CHUNK), 0);
  };
  setTimeout(() => more(TABLE_FIRST), 0);
  $("trial-count").textContent = `${trials.length}`;
}

$("trials").addEventListener("click", (ev) => {
  const th = ev.target.closest("th[data-key]");
  if (!th) return;
  const key = th.dataset.key;
  view.sort = { key, dir: view.sort.key === key ? -view.sort.dir : 1 };
  renderTrials();
});
$("trials").addEventListener("mouseover", (ev) => {
  const tr = ev.target.closest("tr[data-name]");
  if (tr && tr.dataset.name !== view.highlighted) highlight(tr.dataset.name);
});
$("trials").addEventListener("mouseleave", () => highlight(null));

function numbersText(numbers) {
  const parts = [];
  for (const [k, v] of Object.entries(numbers || {})) {
    if (v === null || typeof v === "object") continue;
    parts.push(`${k}=${typeof v === "number" ? +v.toPrecision(5) : v}`);
  }
  return parts.join(" · ");
}

function renderDecisions() {
  const list = [...view.decisions.values()].sort((a, b) => b.id - a.id);
  $("decisions").innerHTML = list.map((d) => `
    <li data-id="${d.id}" class="${d._new ? "new" : ""}">
      <span class="act ${esc(d.action.split(":")[0])}">${esc(d.action)}</span>
      ${d.applied ? "" : `<span class="badge">held: ${esc(d.held_reason)}</span>`}
      <span class="when">rung ${d.rung} · ${esc(new Date(d.decided_at).toLocaleTimeString())}</span>
      <div class="who">${esc(d.canon_name)}${d.seed_state ? ` <span class="muted">${esc(d.seed_state)}</span>` : ""}</div>
      <div class="reason">${esc(d.reason)}</div>
      <div class="numbers">${esc(numbersText(d.numbers))}</div>
    </li>`).join("");
  for (const d of list) d._new = false;
  $("decision-count").textContent = `${list.length}`;
}

function renderTripwires() {
  const wires = view.detail.tripwires;
  $("tripwire-title").hidden = !wires.length;
  $("tripwires").innerHTML = wires.map((w) => `<li><b>${esc(w.kind)}</b>
    ${esc(w.canon_name || "")} <span class="muted">${w.acknowledged_at ? "acknowledged" : "open"}</span></li>`).join("");
}

// ---------------------------------------------------------------------------------------
// Live updates

function listen() {
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => { $("live").className = "live on"; $("live").textContent = "live"; });
  source.addEventListener("error", () => {
    $("live").className = "live off"; $("live").textContent = "reconnecting";
  });
  source.addEventListener("change", (ev) => {
    const marks = JSON.parse(ev.data);
    const old = view.marks;
    view.marks = marks;
    if (!old) return;
    if (old.races !== marks.races || old.decisions !== marks.decisions ||
        old.trials !== marks.trials) loadRaces().catch(() => {});
    if (old.decisions !== marks.decisions) {
      view.decisionsChangedAt = Date.now();  // when the page heard of it (for the tests)
      refreshDecisions(); scheduleRefresh(); return;
    }
    if (old.samples !== marks.samples || old.trials !== marks.trials ||
        old.tripwires !== marks.tripwires) scheduleRefresh();
  });
  view.source = source;
}

async function start() {
  try {
    const meta = await api("/api/meta");
    if (meta.token_required && !hasTokenCookie()) { askToken(false); return; }
    // A race named in the address is fetched at once, beside the list of races.
    const wanted = selectedFromHash();
    if (wanted && !view.race) selectRace(wanted);
    await loadRaces();
    $("token-dialog").open && $("token-dialog").close();
    if (!view.source) listen();
  } catch (err) {
    if (err instanceof Unauthorised) { askToken(true); return; }
    $("races").innerHTML = `<p class="error">${esc(err.message)}</p>`;
  }
}

window.addEventListener("hashchange", () => {
  const wanted = selectedFromHash();
  if (wanted && wanted !== view.race) selectRace(wanted);
});
start();
