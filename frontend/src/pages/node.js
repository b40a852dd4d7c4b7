// Node detail: per-GPU utilisation, memory, power and temperature; host CPU, load, memory.
import { TimeChart, mergePoint } from "../chart.js";
import { ago, el, gib, gpuIndices, num, pct, tile } from "../format.js";
import { windowPicker } from "./window.js";

export function nodePage(root, context) {
  let windowS = 300;
  let node = null;
  let ingest = null; // platform admins only: what became of the node's telemetry
  let points = [];
  const page = { streams: () => context.streams };
  const span = () => windowS;

  const tiles = el("div", { class: "tiles" });
  const rejection = el("p", { class: "error", id: "node-rejection" });
  const gpuTable = el("table", { class: "grid" });
  const charts = el("div", { class: "charts" });
  root.append(el("div", { class: "toolbar" }, windowPicker(windowS, (w) => {
    windowS = w;
    page.reload();
  })), tiles, rejection, gpuTable, charts);
  const perGpu = [
    ["utilization_pct", new TimeChart(charts, { span, title: "GPU utilisation", format: pct })],
    ["memory_used_bytes", new TimeChart(charts, { span, title: "GPU memory used", format: gib })],
    ["power_w", new TimeChart(charts, { span, title: "GPU power", format: (v) => `${num(v, 0)} W` })],
    ["temperature_c", new TimeChart(charts, { span, title: "GPU temperature", format: (v) => `${num(v, 0)} °C` })],
  ];
  const cpu = new TimeChart(charts, { span, title: "Host CPU", format: pct });
  const load = new TimeChart(charts, { span, title: "Host load (1 min)", format: (v) => num(v, 2) });
  const memory = new TimeChart(charts, { span, title: "Host memory used", format: gib });

  function draw() {
    const xs = points.map((p) => p.t);
    const series = (key) => points.map((p) => p.gauges[key] ?? null);
    const gpus = gpuIndices(Object.assign({}, ...points.map((p) => p.gauges), node.gauges));
    const gpuless = node.gpu_count === 0; // nothing to chart: no empty GPU panels
    gpuTable.hidden = gpuless;
    for (const [name, chart] of perGpu) {
      chart.panel.hidden = gpuless;
      chart.update(xs, Object.fromEntries(gpus.map((i) => [`GPU ${i}`, series(`gpu.${i}.${name}`)])));
    }
    cpu.update(xs, { cpu: series("host.cpu_util_pct") });
    load.update(xs, { load1: series("host.load1") });
    memory.update(xs, { used: series("host.mem_used_bytes") });
    const g = node.gauges;
    tiles.replaceChildren(
      tile("status", node.status),
      tile("GPUs", String(node.gpu_count)),
      tile("last batch", ago(node.last_batch_t)),
      tile("CPU", pct(g["host.cpu_util_pct"])),
      tile("load", num(g["host.load1"], 2)),
      tile("memory", `${gib(g["host.mem_used_bytes"])} / ${gib(g["host.mem_total_bytes"])}`),
      ...(ingest ? [tile("rejected batches", String(ingest.rejected_batches), { id: "node-rejected" })] : []),
    );
    rejection.replaceChildren(...(ingest?.last_rejection
      ? [`Last rejected batch, ${ago(ingest.last_rejected_t)}: ${ingest.last_rejection}`]
      : []));
    const cells = (i, name, f) => el("td", {}, f(g[`gpu.${i}.${name}`]));
    gpuTable.replaceChildren(
      el("thead", {}, el("tr", {}, ...["GPU", "Model", "Util", "Memory", "Power", "Temp", "SM MHz", "ECC (unc.)"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...node.gpus.map((gpu) => el(
        "tr", {},
        el("td", {}, String(gpu.index)),
        el("td", {}, gpu.name),
        cells(gpu.index, "utilization_pct", pct),
        cells(gpu.index, "memory_used_bytes", gib),
        cells(gpu.index, "power_w", (v) => (v == null ? "–" : `${num(v, 0)} W`)),
        cells(gpu.index, "temperature_c", (v) => (v == null ? "–" : `${num(v, 0)} °C`)),
        cells(gpu.index, "sm_clock_mhz", (v) => num(v, 0)),
        cells(gpu.index, "ecc_uncorrected", (v) => num(v, 0)),
      ))),
    );
  }

  page.snapshotUrl = () => `${context.snapshot}?window=${windowS}`;
  page.render = (snapshot) => {
    windowS = snapshot.window_s;
    node = snapshot.node;
    ingest = snapshot.ingest;
    points = snapshot.points.slice();
    draw();
  };
  page.apply = (delta) => {
    if (delta.type !== "node.delta") return;
    mergePoint(points, delta.point, windowS);
    node.gauges = { ...node.gauges, ...delta.point.gauges };
    node.last_batch_t = delta.point.t;
    draw();
  };
  return page;
}
