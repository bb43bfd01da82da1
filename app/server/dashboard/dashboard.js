// recsvc dashboard: polls /metrics, /v1/model and /v1/log and draws them with uPlot.
// Everything is computed in the browser from what the service already serves; the
// key typed in the form is kept for this tab only (sessionStorage) and sent as
// X-API-Key. Each chart's container gets data-points (how many points it draws), which
// the headless-browser test reads.
"use strict";

const POLL_MS = 2000;
const LOG_POLL_MS = 10000;
const KEEP = 900;  // points kept per live series (30 minutes at POLL_MS)
const KEY_STORE = "recsvc-key";

let apiKey = sessionStorage.getItem(KEY_STORE) || "";
const $ = (id) => document.getElementById(id);

async function get(path, asText) {
  const headers = apiKey ? {"X-API-Key": apiKey} : {};
  const resp = await fetch(path, {headers, cache: "no-store"});
  if (!resp.ok) {
    const err = new Error(`${path}: ${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return asText ? resp.text() : resp.json();
}

// Prometheus text format -> {name: [{labels, value}]}
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const pair of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[pair[1]] = pair[2];
      }
    }
    (out[m[1]] = out[m[1]] || []).push({labels, value: parseFloat(m[4])});
  }
  return out;
}

function total(metrics, name, filter) {
  return (metrics[name] || [])
    .filter((s) => !filter || filter(s.labels))
    .reduce((acc, s) => acc + s.value, 0);
}

// the latency quantile q (seconds) from the change of a histogram's buckets
function quantile(q, now, before) {
  if (!before) return null;
  const count = now.count - before.count;
  if (count <= 0) return null;
  let lastLe = 0;
  let lastCum = 0;
  for (const [le, cum] of now.buckets) {
    const c = cum - (before.bucketMap.get(le) || 0);
    if (c >= q * count) {
      if (!isFinite(le)) return lastLe;
      const within = c - lastCum;
      return within > 0 ? lastLe + (le - lastLe) * (q * count - lastCum) / within : le;
    }
    lastLe = le;
    lastCum = c;
  }
  return lastLe;
}

function recommendLatency(metrics) {
  const isRecommend = (l) => l.route === "/v1/recommend";
  const byLe = new Map();
  for (const s of metrics.recsvc_http_request_duration_seconds_bucket || []) {
    if (!isRecommend(s.labels)) continue;
    const le = s.labels.le === "+Inf" ? Infinity : parseFloat(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  const buckets = [...byLe.entries()].sort((a, b) => a[0] - b[0]);
  return {count: total(metrics, "recsvc_http_request_duration_seconds_count", isRecommend),
          buckets, bucketMap: byLe};
}

function makeChart(id, series, scales) {
  const el = $(id);
  const opts = {
    width: el.clientWidth || 560, height: 200,
    scales: Object.assign({x: {time: true}}, scales || {}),
    series: [{}].concat(series),
    axes: [{}, {size: 60}].concat(series.some((s) => s.scale === "r") ? [{side: 1, scale: "r", grid: {show: false}}] : []),
    legend: {live: false},
  };
  const data = [[]].concat(series.map(() => []));
  return {el, plot: new uPlot(opts, data, el), data};
}

const charts = {
  log: makeChart("c-log", [{label: "CTR", stroke: "#1f77b4", width: 2, points: {show: true}}]),
  reward: makeChart("c-reward", [{label: "reward / shown item", stroke: "#2ca02c", width: 2}]),
  rates: makeChart("c-rates", [{label: "recommend /s", stroke: "#1f77b4"},
                               {label: "feedback /s", stroke: "#ff7f0e"}]),
  latency: makeChart("c-latency", [{label: "p50", stroke: "#2ca02c"}, {label: "p95", stroke: "#ff7f0e"},
                                   {label: "p99", stroke: "#d62728"}]),
  learning: makeChart("c-learning", [{label: "version", stroke: "#9467bd", width: 2},
                                     {label: "loss", stroke: "#8c564b", scale: "r"}]),
  epsilon: makeChart("c-epsilon", [{label: "epsilon", stroke: "#17becf", width: 2}]),
};

function push(chart, t, values) {
  chart.data[0].push(t);
  values.forEach((v, i) => chart.data[i + 1].push(v));
  if (chart.data[0].length > KEEP) chart.data.forEach((col) => col.shift());
  draw(chart);
}

function draw(chart) {
  chart.plot.setData(chart.data);
  const xs = chart.data[0];
  if (xs.length === 1) {  // one point alone would stretch the time axis over years
    chart.plot.setScale("x", {min: xs[0] - 300, max: xs[0] + 300});
  }
  const points = chart.data.slice(1)
    .reduce((n, col) => n + col.filter((v) => v !== null && isFinite(v)).length, 0);
  chart.el.dataset.points = String(points);
  const first = chart.data[1];
  if (first.length) chart.el.dataset.last = String(first[first.length - 1]);
}

function setText(id, text) { $(id).textContent = text; }

function fmt(v, digits) {
  return v === null || v === undefined || !isFinite(v) ? "-" : Number(v).toFixed(digits);
}

function showStatus(text, bad) {
  const el = $("status");
  el.textContent = text;
  el.className = bad ? "bad" : "";
}

let previous = null;

async function pollMetrics() {
  const t = Date.now() / 1000;
  const metrics = parseMetrics(await get("/metrics", true));
  const now = {
    t,
    items: total(metrics, "recsvc_recommended_items_total"),
    reward: total(metrics, "recsvc_feedback_reward_total"),
    slates: total(metrics, "recsvc_recommendations_total"),
    feedback: total(metrics, "recsvc_feedback_total"),
    latency: recommendLatency(metrics),
  };
  // a counter that went down: the process restarted, or (behind a load balancer) this
  // read came from another replica; no rate can be told from the two reads
  const reset = previous && (["items", "reward", "slates", "feedback"].some((k) => now[k] < previous[k])
                             || now.latency.count < previous.latency.count);
  if (previous && !reset) {
    const dt = Math.max(t - previous.t, 1e-3);
    const shown = now.items - previous.items;
    push(charts.reward, t, [shown > 0 ? (now.reward - previous.reward) / shown : null]);
    push(charts.rates, t, [(now.slates - previous.slates) / dt, (now.feedback - previous.feedback) / dt]);
    push(charts.latency, t, [0.5, 0.95, 0.99].map((q) => {
      const s = quantile(q, now.latency, previous.latency);
      return s === null ? null : 1000 * s;
    }));
  }
  previous = now;
  const loss = total(metrics, "recsvc_learner_loss");
  const age = total(metrics, "recsvc_model_age_seconds");
  setText("t-age", isFinite(age) ? `${fmt(age, 0)} s` : "-");
  setText("t-catalog", fmt(total(metrics, "recsvc_catalog_items"), 0));
  const up = total(metrics, "recsvc_store_up");
  setText("t-store", up >= 1 ? "up" : "unavailable");
  $("t-store").className = up >= 1 ? "value" : "value bad";
  setText("t-backlog", fmt(total(metrics, "recsvc_stream_backlog"), 0));
  setText("t-held", fmt(total(metrics, "recsvc_held_impressions"), 0));
  return isFinite(loss) ? loss : null;
}

function fillTable(id, rows, cells) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...Object.entries(rows || {}).map(([name, v]) => {
    const tr = document.createElement("tr");
    for (const text of [name, ...cells(v)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
}

async function pollModel(loss) {
  const model = await get("/v1/model");
  const t = Date.now() / 1000;
  setText("t-version", String(model.version));
  setText("t-updates", String(model.updates));
  setText("t-learned", String(model.feedback_learned));
  setText("t-epsilon", fmt(model.epsilon, 3));
  push(charts.learning, t, [model.version, loss]);
  push(charts.epsilon, t, [model.epsilon]);
  fillTable("arms", model.agents, (v) => [fmt(v.weight, 3), fmt(v.value, 4), fmt(v.se, 4)]);
  fillTable("sources", model.sources, (v) => [fmt(v.value, 4), fmt(v.se, 4),
                                              v.reach === null ? "-" : fmt(v.reach, 0)]);
}

async function pollLog() {
  let records;
  try {
    records = (await get("/v1/log?limit=5000")).records;
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      $("c-log").dataset.note = "the evaluation log needs an admin key";
      return;
    }
    throw err;
  }
  // about 60 buckets over the span of the log, each at least 10 s wide
  const times = records.map((r) => r.ts);
  const span = times.length ? Math.max(...times) - Math.min(...times) : 0;
  const width = Math.max(10, Math.ceil(span / 60 / 10) * 10);
  const buckets = new Map();
  for (const r of records) {
    const b = Math.floor(r.ts / width) * width;
    const agg = buckets.get(b) || {shown: 0, positive: 0};
    agg.shown += r.item_ids.length;
    agg.positive += Object.values(r.rewards || {}).filter((x) => x > 0).length;
    buckets.set(b, agg);
  }
  const keys = [...buckets.keys()].sort((a, b) => a - b);
  charts.log.data = [keys, keys.map((k) => buckets.get(k).positive / buckets.get(k).shown)];
  $("c-log").previousElementSibling.textContent =
    `CTR per shown item, per ${width} s (evaluation log: closed slates)`;
  delete $("c-log").dataset.note;
  draw(charts.log);
}

async function tick() {
  try {
    const loss = await pollMetrics();
    await pollModel(loss);
    showStatus(`updated ${new Date().toLocaleTimeString()}`, false);
  } catch (err) {
    showStatus(err.status === 401 || err.status === 403
      ? "the service wants a key: type an admin key above" : `${err.message}`, true);
  }
}

async function tickLog() {
  try {
    await pollLog();
  } catch (err) {
    showStatus(err.message, true);
  }
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("key").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  $("key").value = "";
  tick();
  tickLog();
});

window.addEventListener("resize", () => {
  for (const c of Object.values(charts)) c.plot.setSize({width: c.el.clientWidth, height: 200});
});

tick();
tickLog();
setInterval(tick, POLL_MS);
setInterval(tickLog, LOG_POLL_MS);
