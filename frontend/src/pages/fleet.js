// Fleet overview: the health roll-up (pages firing, SLOs at risk, nodes not ready, the
// worst SLOs), then every visible node with its GPUs, latest gauges and health.
import { ago, el, gpuIndices, num, pct, tile } from "../format.js";
import { follow } from "../live.js";
import { sloTable } from "./slotable.js";

const STALE_S = 30;

function gpuStats(gauges) {
  const gpus = gpuIndices(gauges);
  const values = (name) => gpus.map((i) => gauges[`gpu.${i}.${name}`]).filter((v) => v != null);
  const util = values("utilization_pct");
  const sum = (list) => list.reduce((a, b) => a + b, 0);
  return {
    util: util.length ? sum(util) / util.length : null,
    memUsed: sum(values("memory_used_bytes")),
    memTotal: sum(values("memory_total_bytes")),
    power: values("power_w").length ? sum(values("power_w")) : null,
    temp: values("temperature_c").length ? Math.max(...values("temperature_c")) : null,
    ecc: sum(values("ecc_uncorrected")),
  };
}

function health(node, stats) {
  if (node.status !== "ready") return ["bad", node.status];
  if (node.maintenance) return ["warn", "maintenance"];
  if (stats.ecc > 0) return ["bad", "ECC errors"];
  if (node.last_batch_t == null || Date.now() / 1000 - node.last_batch_t > STALE_S) {
    return ["warn", "no telemetry"];
  }
  return ["ok", "healthy"];
}

export function fleetPage(root, context) {
  let nodes = new Map();
  const nodeUrl = (id) => `${context.consoleUrl}nodes/${id}/`;
  const tiles = el("div", { class: "tiles" });
  const body = el("tbody");
  const headers = ["Node", "Status", "GPUs", "GPU util", "GPU memory", "Power", "Max temp", "CPU", "Last batch", "Health"];
  const rollup = el("div", { class: "tiles", id: "fleet-health" });
  const worst = sloTable(context.consoleUrl, { showTenant: context.platformAdmin });
  worst.id = "slo-table";
  root.append(el("h2", {}, "Health"), rollup, worst, el("h2", {}, "Nodes"));
  follow(context.health, 5000, (h) => {
    const atRisk = h.slo_counts.exhausted + h.slo_counts.burning + h.slo_counts.at_risk;
    const bad = (n) => (n ? "tile bad" : "tile");
    rollup.replaceChildren(
      tile("pages firing", String(h.pages_firing), { id: "health-pages", class: bad(h.pages_firing) }),
      tile("SLOs at risk or worse", `${atRisk} of ${h.slos}`, { id: "health-slos", class: bad(atRisk) }),
      tile("budget exhausted", String(h.slo_counts.exhausted), { class: bad(h.slo_counts.exhausted) }),
      tile("SLOs with no data", String(h.slo_counts.no_data)),
      tile("nodes not ready", `${h.nodes_not_ready} of ${h.nodes}`, { id: "health-nodes", class: bad(h.nodes_not_ready) }),
    );
    worst.update(h.worst.filter((s) => s.state !== "ok"));
    worst.hidden = !worst.querySelector("tbody tr[data-slo]");
  });
  root.append(tiles, el("table", { class: "grid", id: "fleet-table" }, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))), body));

  function draw() {
    const rows = [...nodes.values()].sort((a, b) => a.hostname.localeCompare(b.hostname));
    let gpus = 0;
    let ready = 0;
    const utils = [];
    body.replaceChildren(
      ...rows.map((node) => {
        const stats = gpuStats(node.gauges);
        const [level, text] = health(node, stats);
        gpus += node.gpu_count;
        if (node.status === "ready") ready += 1;
        if (stats.util != null) utils.push(stats.util);
        const memory = stats.memTotal ? pct((100 * stats.memUsed) / stats.memTotal) : "–";
        return el(
          "tr",
          { dataset: { node: node.id } },
          el("td", {}, el("a", { href: nodeUrl(node.id) }, node.hostname)),
          el("td", {}, node.status),
          el("td", {}, String(node.gpu_count)),
          el("td", {}, pct(stats.util)),
          el("td", {}, memory),
          el("td", {}, stats.power == null ? "–" : `${num(stats.power, 0)} W`),
          el("td", {}, stats.temp == null ? "–" : `${num(stats.temp, 0)} °C`),
          el("td", {}, pct(node.gauges["host.cpu_util_pct"])),
          el("td", {}, ago(node.last_batch_t)),
          el("td", {}, el("span", { class: `badge ${level}` }, text)),
        );
      }),
    );
    const meanUtil = utils.length ? utils.reduce((a, b) => a + b, 0) / utils.length : null;
    tiles.replaceChildren(
      tile("nodes", String(rows.length)),
      tile("ready", String(ready)),
      tile("GPUs", String(gpus)),
      tile("mean GPU util", pct(meanUtil)),
    );
  }

  const page = {
    snapshotUrl: () => context.snapshot,
    // Platform admins follow the fleet stream; others follow each node they may see.
    streams: (snapshot) =>
      context.platformAdmin ? context.streams : snapshot.nodes.map((n) => `node:${n.id}`),
    render(snapshot) {
      nodes = new Map(snapshot.nodes.map((n) => [n.id, n]));
      draw();
    },
    apply(delta) {
      const updates =
        delta.type === "fleet.delta"
          ? delta.nodes.map((n) => ({ id: n.id, status: n.status, t: n.t, gauges: n.gauges }))
          : delta.type === "node.delta"
            ? [{ id: delta.node_id, t: delta.point.t, gauges: delta.point.gauges }]
            : [];
      for (const update of updates) {
        const node = nodes.get(update.id);
        if (!node) {
          page.reload();
          return;
        }
        if (update.status) node.status = update.status;
        node.last_batch_t = update.t;
        node.gauges = { ...node.gauges, ...update.gauges };
      }
      draw();
    },
  };
  window.setInterval(draw, 5000); // keeps "last batch" ages and health current
  return page;
}
