// The SLO list (overview, tenant page, fleet roll-up): one row per SLO, worst first, with
// its state, objective against achieved, budget left and its trend, the fastest page
// rule's windows against their factor, and what fires.
import { sparkline } from "../chart.js";
import { count, duration, el, rate, ratio } from "../format.js";

export const STATE_TEXT = {
  exhausted: ["bad", "budget exhausted"],
  burning: ["bad", "burning"],
  at_risk: ["warn", "at risk"],
  no_data: ["none", "no data"],
  ok: ["ok", "ok"],
};

const WINDOW_TEXT = { rolling_7d: "7 d", rolling_28d: "28 d", rolling_30d: "30 d", calendar_month: "month" };

export function sliText(slo) {
  const where = slo.measured_at === "gateway" ? ", at the gateway" : "";
  if (slo.sli === "availability") return `availability${where}`;
  const name = slo.sli === "storage_read" ? "storage read" : slo.sli.toUpperCase();
  return `${name} ≤ ${duration(slo.threshold_seconds)}${where}`;
}

export const windowText = (w) => WINDOW_TEXT[w] ?? w;

// 99 %, 99.9 %, 99.95 %: as many digits as the objective has.
export const objectiveText = (v) => `${Number((v * 100).toFixed(3))} %`;

export function stateBadge(state) {
  const [level, text] = STATE_TEXT[state];
  return el("span", { class: `badge ${level}`, dataset: { state } }, text);
}

// "1h 20.1× · 5m 30.2× / 14.4×": red when both windows reach the factor (the alert fires).
function burnText(rule) {
  return el(
    "span",
    { class: rule.burning ? "burn bad" : "burn", title: `${rule.severity} alert at ${rule.factor}× over both windows` },
    `${rule.long_window} ${rate(rule.long_rate)} · ${rule.short_window} ${rate(rule.short_rate)}`,
    el("span", { class: "factor" }, ` / ${rate(rule.factor)}`),
  );
}

export function sloTable(consoleUrl, { showTenant }) {
  const body = el("tbody");
  const headers = ["SLO", ...(showTenant ? ["Tenant"] : []), "State", "Objective", "Achieved", "Error budget left", "Burn rate (page rules) / factor", "Firing"];
  const table = el("table", { class: "grid slo-table" }, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))), body);
  table.update = (slos) => {
    body.replaceChildren(...(slos.length ? slos.map((slo) => {
      const missed = slo.achieved_ratio != null && slo.achieved_ratio < slo.objective;
      const pages = slo.burn_rates.filter((r) => r.severity === "page");
      return el(
        "tr", { dataset: { slo: slo.id, state: slo.state } },
        el("td", {}, el("a", { href: `${consoleUrl}slos/${slo.id}/` }, slo.display_name), el("div", { class: "sub" }, sliText(slo))),
        ...(showTenant ? [el("td", {}, slo.tenant.slug)] : []),
        el("td", {}, stateBadge(slo.state)),
        el("td", {}, objectiveText(slo.objective), el("div", { class: "sub" }, windowText(slo.window))),
        el("td", { class: missed ? "bad" : null }, ratio(slo.achieved_ratio, 2), el("div", { class: "sub" }, `${count(slo.good)} / ${count(slo.total)}`)),
        el("td", { class: slo.budget_remaining_ratio <= 0 ? "bad budget" : "budget" },
          el("div", { class: "budget-cell" }, el("span", {}, ratio(slo.budget_remaining_ratio, 1)), sparkline(slo.budget_sparkline.map((p) => p.value)))),
        el("td", {}, ...pages.map((rule) => el("div", {}, burnText(rule)))),
        el("td", { class: "firing" }, ...slo.firing.map((a) => el("span", { class: `badge ${a.severity === "page" ? "bad" : "warn"}`, title: a.summary }, a.alertname.replace(/^SLO/, "")))),
      );
    }) : [el("tr", {}, el("td", { colspan: String(headers.length) }, "No SLOs yet."))]));
  };
  return table;
}
