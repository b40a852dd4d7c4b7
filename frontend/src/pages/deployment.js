// Deployment: TTFT and TPOT p50/p99, tokens/s, queue depth and errors over the window, and
// where its gateways routed requests (each replica's rate and predicted TTFT).
import { TimeChart, mergePoint } from "../chart.js";
import { duration, el, num, tile } from "../format.js";
import { WINDOWS, windowPicker } from "./window.js";

const pick = (points, f) => points.map((p) => f(p) ?? null);

export function deploymentPage(root, context) {
  let windowS = 300;
  let points = [];
  let summary = null;
  // Tiles show the whole window, from the snapshot, reloaded often; charts follow deltas.
  const page = { streams: () => context.streams, refreshMs: 10000 };
  const span = () => windowS;

  const tiles = el("div", { class: "tiles" });
  const charts = el("div", { class: "charts" });
  const routing = el("section", { class: "panel", id: "routing", hidden: "" });
  root.append(el("div", { class: "toolbar" }, windowPicker(windowS, (w) => {
    windowS = w;
    page.reload();
  })), tiles, charts, routing);
  // the SLOs that measure this deployment, drawn as lines on their metric's chart
  const lines = (metric) => context.thresholds
    .filter((t) => t.metric === metric)
    .map((t) => ({ value: t.seconds, label: `${t.label} ≤ ${duration(t.seconds)}` }));
  const ttft = new TimeChart(charts, { span, title: "Time to first token", format: duration, lines: lines("ttft") });
  const tpot = new TimeChart(charts, { span, title: "Time per output token", format: duration, lines: lines("tpot") });
  const tokens = new TimeChart(charts, { span, title: "Output tokens/s", format: (v) => num(v, Math.abs(v) >= 10 || Number.isInteger(v) ? 0 : 1) });
  const queue = new TimeChart(charts, { span, title: "Queue depth", format: (v) => num(v, 1) });
  const errors = new TimeChart(charts, { span, title: "Errors/s", format: (v) => num(v, 2) });
  const routed = new TimeChart(charts, { span, title: "Requests/s routed, by replica", format: (v) => num(v, 1) });
  routed.panel.id = "chart-routed";
  routed.panel.hidden = true;
  ttft.panel.id = "chart-ttft";
  tpot.panel.id = "chart-tpot";

  // Where the gateways sent requests, and why: the lowest predicted TTFT wins.
  function drawRouting(info) {
    const known = info.replicas.filter((r) => r.up != null);
    routing.hidden = routed.panel.hidden = known.length === 0;
    if (!known.length) return;
    const name = (r) => `#${r.index} on ${r.hostname}`;
    routed.update(info.points.map((p) => p.t), Object.fromEntries(info.replicas.map((r) => [name(r), info.points.map((p) => p.routed[r.id] ?? null)])));
    const cell = (text, attrs = {}) => el("td", attrs, text);
    routing.replaceChildren(
      el("h2", {}, "Routing"),
      el("p", { class: "muted" }, "Each request goes to the replica whose predicted time to first token is lowest, from the state it streams (queue, free slots, step and prompt cost) and the TTFTs the gateway measured from it."),
      el("table", { class: "grid", id: "routing-table" },
        el("thead", {}, el("tr", {}, ...["Replica", "State", "Routed/s", "Predicted TTFT now"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...info.replicas.map((r) => el("tr", {},
          cell(name(r)),
          cell(r.up == null ? "–" : r.up ? "up" : "down", { class: r.up === false ? "bad" : null }),
          cell(num(r.routed_per_s, 2)),
          cell(duration(r.predicted_ttft_s)),
        )))),
    );
  }

  function draw() {
    const xs = points.map((p) => p.t);
    ttft.update(xs, {
      p50: pick(points, (p) => p.latency.ttft?.p50),
      p99: pick(points, (p) => p.latency.ttft?.p99),
    });
    tpot.update(xs, {
      p50: pick(points, (p) => p.latency.tpot?.p50),
      p99: pick(points, (p) => p.latency.tpot?.p99),
    });
    tokens.update(xs, { "tokens/s": pick(points, (p) => p.tokens_per_s) });
    queue.update(xs, { queued: pick(points, (p) => p.queue_depth) });
    errors.update(xs, {
      failed: pick(points, (p) => p.usage.failed / p.window_s),
      rejected: pick(points, (p) => p.usage.rejected / p.window_s),
    });
    const usage = summary.usage;
    const over = WINDOWS.find(([seconds]) => seconds === windowS)?.[1] ?? `${windowS} s`;
    tiles.replaceChildren(
      tile(`TTFT p50, ${over}`, duration(summary.latency.ttft?.p50), { id: "tile-ttft-p50" }),
      tile(`TTFT p99, ${over}`, duration(summary.latency.ttft?.p99), { id: "tile-ttft-p99" }),
      tile(`TPOT p50, ${over}`, duration(summary.latency.tpot?.p50)),
      tile(`TPOT p99, ${over}`, duration(summary.latency.tpot?.p99)),
      tile(`tokens/s, ${over}`, num(summary.tokens_per_s, 0)),
      tile("queue now", num(summary.queue_depth, 0)),
      tile("completed", String(usage.completed)),
      tile("errors", String(usage.failed + usage.rejected), { class: usage.failed + usage.rejected ? "tile bad" : "tile" }),
    );
  }

  page.snapshotUrl = () => `${context.snapshot}?window=${windowS}`;
  page.render = (snapshot) => {
    windowS = snapshot.window_s;
    for (const chart of [ttft, tpot, tokens, queue, errors]) chart.step = snapshot.resolution;
    points = snapshot.points.slice();
    summary = snapshot.summary;
    routed.step = snapshot.resolution;
    drawRouting(snapshot.routing);
    draw();
  };
  page.apply = (delta) => {
    if (delta.type !== "deployment.delta") return;
    mergePoint(points, delta.point, windowS);
    summary.queue_depth = delta.point.queue_depth;
    for (const [name, value] of Object.entries(delta.point.usage)) summary.usage[name] += value;
    draw();
  };
  return page;
}
