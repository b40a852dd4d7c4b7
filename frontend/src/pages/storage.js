// Storage: per node, each visible volume's IOPS, MB/s and latency.
import { TimeChart, mergePoint } from "../chart.js";
import { el, num } from "../format.js";
import { windowPicker } from "./window.js";

const FIELDS = [
  ["iops", "IOPS", "read_iops", "write_iops", (v) => num(v, 0)],
  ["mbs", "MB/s", "read_mb_s", "write_mb_s", (v) => num(v, 1)],
  ["latency", "Latency", "read_latency_us", "write_latency_us", (v) => (v == null ? "–" : `${num(v, Math.abs(v) < 10 ? 1 : 0)} µs`)],
];

function storageOnly(gauges) {
  return Object.fromEntries(Object.entries(gauges).filter(([key]) => key.startsWith("storage.")));
}

export function storagePage(root, context) {
  let windowS = 300;
  let nodes = new Map();
  const sections = el("div");
  const page = {};
  root.append(el("div", { class: "toolbar" }, windowPicker(windowS, (w) => {
    windowS = w;
    page.reload();
  })), sections);

  function drawNode(entry) {
    const { node, charts, table } = entry;
    const xs = node.points.map((p) => p.t);
    const latest = Object.assign({}, ...node.points.map((p) => p.gauges));
    for (const [id, , read, write] of FIELDS) {
      const series = {};
      for (const volume of node.volumes) {
        series[`${volume.name} read`] = node.points.map((p) => p.gauges[`storage.${volume.key}.${read}`] ?? null);
        series[`${volume.name} write`] = node.points.map((p) => p.gauges[`storage.${volume.key}.${write}`] ?? null);
      }
      charts[id].update(xs, series);
    }
    const value = (volume, name, f) => el("td", {}, f(latest[`storage.${volume.key}.${name}`]));
    table.replaceChildren(
      el("thead", {}, el("tr", {}, ...["Volume", "Read IOPS", "Write IOPS", "Read MB/s", "Write MB/s", "Read µs", "Write µs"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...node.volumes.map((volume) => el(
        "tr", {},
        el("td", {}, volume.name),
        ...FIELDS.flatMap(([, , read, write, f]) => [value(volume, read, f), value(volume, write, f)]),
      ))),
    );
  }

  page.snapshotUrl = () => `${context.snapshot}?window=${windowS}`;
  page.streams = (snapshot) => snapshot.nodes.map((n) => `node:${n.id}`);
  page.render = (snapshot) => {
    windowS = snapshot.window_s;
    nodes = new Map();
    sections.replaceChildren();
    if (!snapshot.nodes.length) sections.append(el("p", {}, "No storage pools on visible nodes."));
    for (const node of snapshot.nodes) {
      const table = el("table", { class: "grid" });
      const grid = el("div", { class: "charts" });
      sections.append(el("section", { class: "node-storage" }, el("h2", {}, node.hostname), table, grid));
      const charts = Object.fromEntries(FIELDS.map(([id, title, , , format]) => [id, new TimeChart(grid, { title, format, span: () => windowS })]));
      const entry = { node, charts, table };
      nodes.set(node.id, entry);
      drawNode(entry);
    }
  };
  page.apply = (delta) => {
    const entry = delta.type === "node.delta" && nodes.get(delta.node_id);
    if (!entry) return;
    const gauges = storageOnly(delta.point.gauges);
    const known = new Set(entry.node.volumes.map((v) => v.key));
    for (const key of Object.keys(gauges)) {
      const volume = key.split(".")[1];
      if (!known.has(volume)) {
        known.add(volume);
        entry.node.volumes.push({ key: volume, name: volume, tenant: null });
      }
    }
    mergePoint(entry.node.points, { t: delta.point.t, gauges }, windowS);
    drawNode(entry);
  };
  return page;
}
