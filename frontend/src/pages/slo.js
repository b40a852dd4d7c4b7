// One SLO: budget left over its window, burn rates against the alert factors, the SLI's
// percentiles against its threshold, good/total, the alerts, and the changes around it,
// drawn as marks on every chart so the why sits beside the what.
import { TimeChart } from "../chart.js";
import { count, duration, el, num, rate, ratio, tile, when } from "../format.js";
import { WINDOWS, windowPicker } from "./window.js";
import { objectiveText, sliText, stateBadge, windowText } from "./slotable.js";

const FACTOR_COLORS = { page: "#dc2626", ticket: "#d97706" };

function marksOf(snapshot) {
  const marks = snapshot.changes.map((c) => ({ t: c.t, label: c.text, color: "#6b7280" }));
  for (const alert of snapshot.alerts) {
    const color = alert.severity === "page" ? "#dc2626" : "#d97706";
    marks.push({ t: Date.parse(alert.starts_at) / 1000, label: `${alert.alertname} fired`, color });
    if (alert.ends_at) marks.push({ t: Date.parse(alert.ends_at) / 1000, label: `${alert.alertname} resolved`, color: "#16a34a" });
  }
  return marks.sort((a, b) => a.t - b.t);
}

function table(id, headers, rows, empty) {
  return el(
    "table", { class: "grid", id },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: String(headers.length) }, empty))])),
  );
}

export function sloPage(root, context) {
  let rangeS = 86400;
  let snapshot = null;
  const page = { streams: () => [], refreshMs: 10000 };
  const span = () => rangeS;
  const toolbar = el("div", { class: "toolbar" }, el("label", {}, "Range ", windowPicker(rangeS, (w) => {
    rangeS = w;
    page.reload();
  })));
  if (context.report) toolbar.append(" ", el("a", { href: context.report, id: "slo-report-link" }, "SLO report →"));
  const tiles = el("div", { class: "tiles" });
  const charts = el("div", { class: "charts" });
  const tables = el("div");
  root.append(toolbar, tiles, charts, tables);

  const budget = new TimeChart(charts, {
    title: "Error budget remaining (SLO window)",
    span: () => (snapshot ? snapshot.budget.at(-1).t - snapshot.budget[0].t : 86400),
    format: (v) => ratio(v, 0),
    lines: [{ value: 0, label: "budget exhausted", color: "#dc2626" }],
  });
  const burn = new TimeChart(charts, { title: "Burn rate (long windows)", span, format: rate });
  const latency = new TimeChart(charts, { title: "SLI percentiles", span, format: duration });
  const events = new TimeChart(charts, { title: "Events per second", span, format: (v) => num(v, v < 10 ? 2 : 0) });
  budget.panel.id = "chart-budget";
  burn.panel.id = "chart-burn";
  latency.panel.id = "chart-latency";
  events.panel.id = "chart-events";

  page.snapshotUrl = () => `${context.snapshot}?range=${rangeS}`;
  page.render = (data) => {
    snapshot = data;
    rangeS = data.range_s;
    const slo = data.slo;
    const marks = marksOf(data);
    // The range tiles count the revision in force only; the chart shows every revision's
    // counts, each against its own threshold, summed per bucket.
    const current = data.events.filter((p) => p.revision === slo.revision);
    const inRange = current.reduce((a, p) => ({ good: a.good + p.good, total: a.total + p.total }), { good: 0, total: 0 });
    const spansRevisions = current.length < data.events.length;
    const perBucket = new Map();
    for (const p of data.events) {
      const b = perBucket.get(p.t) ?? { t: p.t, good: 0, total: 0 };
      b.good += p.good;
      b.total += p.total;
      perBucket.set(p.t, b);
    }
    const buckets = [...perBucket.values()];
    const worstP99 = Math.max(...data.percentiles.map((p) => p.p99 ?? 0), 0);
    const range = WINDOWS.find(([s]) => s === rangeS)?.[1] ?? `${rangeS} s`;
    const over = range + (spansRevisions ? `, revision ${slo.revision}` : "");
    tiles.replaceChildren(
      tile("state", stateBadge(slo.state), { id: "tile-state" }),
      tile(`objective, ${windowText(slo.window)}`, objectiveText(slo.objective)),
      tile(`achieved, ${windowText(slo.window)}`, ratio(slo.achieved_ratio, 2), { id: "tile-achieved", class: slo.achieved_ratio != null && slo.achieved_ratio < slo.objective ? "tile bad" : "tile" }),
      tile("error budget left", ratio(slo.budget_remaining_ratio, 1), { id: "tile-budget", class: slo.budget_remaining_ratio <= 0 ? "tile bad" : "tile" }),
      tile(`good / total, ${windowText(slo.window)}`, `${count(slo.good)} / ${count(slo.total)}`, { id: "tile-good-total" }),
      tile(`achieved, ${over}`, inRange.total ? ratio(inRange.good / inRange.total, 2) : "–", { id: "tile-range-achieved" }),
      tile(`events, ${over}`, count(inRange.total)),
      ...(slo.threshold_seconds != null ? [tile(`worst p99, ${range}`, data.percentiles.length ? duration(worstP99) : "–", { class: worstP99 > slo.threshold_seconds ? "tile bad" : "tile" })] : []),
    );

    budget.marks = marks;
    budget.update(data.budget.map((p) => p.t), { "budget left": data.budget.map((p) => p.value) });

    burn.lines = data.burn.thresholds.map((r) => ({ value: r.factor, label: `${r.severity} ${rate(r.factor)} over ${r.window}`, color: FACTOR_COLORS[r.severity] }));
    burn.marks = marks;
    burn.update(data.burn.t, data.burn.series);

    latency.step = data.resolution;
    latency.lines = slo.threshold_seconds != null ? [{ value: slo.threshold_seconds, label: `threshold ${duration(slo.threshold_seconds)}` }] : [];
    latency.marks = marks;
    const pts = data.percentiles;
    latency.update(pts.map((p) => p.t), { p50: pts.map((p) => p.p50), p90: pts.map((p) => p.p90), p99: pts.map((p) => p.p99) });
    latency.panel.hidden = slo.threshold_seconds == null;

    events.step = data.resolution;
    events.marks = marks;
    events.update(buckets.map((p) => p.t), {
      good: buckets.map((p) => p.good / data.resolution),
      bad: buckets.map((p) => (p.total - p.good) / data.resolution),
    });

    tables.replaceChildren(
      el("h2", {}, "Alert rules (multi-window burn rate)"),
      table("slo-rules", ["Severity", "Factor", "Long window", "Short window", "Both at or over the factor"], slo.burn_rates.map((r) => el(
        "tr", {},
        el("td", {}, r.severity), el("td", {}, rate(r.factor)),
        el("td", { class: r.long_rate >= r.factor ? "bad" : null }, `${r.long_window}: ${rate(r.long_rate)}`),
        el("td", { class: r.short_rate >= r.factor ? "bad" : null }, `${r.short_window}: ${rate(r.short_rate)}`),
        el("td", { class: r.burning ? "bad" : null }, r.burning ? "yes: fires" : "no"),
      )), "No rules."),
      el("h2", {}, "Alerts"),
      table("slo-alerts", ["Alert", "Severity", "Window", "Started", "Ended", "Summary"], data.alerts.slice().reverse().map((a) => el(
        "tr", { dataset: { state: a.state } },
        el("td", {}, a.alertname), el("td", {}, a.severity), el("td", {}, a.window || "–"),
        el("td", {}, when(Date.parse(a.starts_at) / 1000)),
        el("td", { class: a.ends_at ? null : "bad" }, a.ends_at ? when(Date.parse(a.ends_at) / 1000) : "firing"),
        el("td", {}, a.summary),
      )), "No alerts in the SLO's window."),
      el("h2", {}, "Changes"),
      table("slo-changes", ["When", "What"], data.changes.slice().reverse().map((c) => el(
        "tr", {}, el("td", {}, when(c.t)), el("td", {}, c.text),
      )), "No recorded changes in the SLO's window."),
      el("p", { class: "muted" }, `${sliText(slo)}, scope ${slo.scope}${slo.deployment ? ` (${slo.deployment})` : ""}${slo.model_name ? ` (${slo.model_name})` : ""}; measured on ${data.deployments.map((d) => d.name).join(", ") || "no deployment"}.`),
    );
  };
  page.apply = () => {};
  return page;
}
