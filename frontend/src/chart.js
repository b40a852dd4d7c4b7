// Time-series charts on uPlot: one chart per panel, series keyed by label.
import uPlot from "uplot";

// Room for the widest tick label ("1250.0 ms"), measured in the axis's own font, so no
// label is clipped whatever the values.
function axisSize(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  u.ctx.font = axis.font[0];
  const widest = Math.max(0, ...(values ?? []).map((v) => u.ctx.measureText(v).width));
  return Math.ceil(widest / devicePixelRatio) + axis.ticks.size + axis.gap + 8;
}

const PALETTE = [
  "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
];

// Where consecutive points lie more than 1.5 steps apart, a null point, so the line breaks
// there: no data is drawn as a gap, never as a straight line or a zero.
export function withGaps(xs, series, step) {
  if (!step) return [xs, series];
  const gapXs = [];
  const gapSeries = Object.fromEntries(Object.keys(series).map((k) => [k, []]));
  xs.forEach((x, i) => {
    if (i > 0 && x - xs[i - 1] > 1.5 * step) {
      gapXs.push(xs[i - 1] + step);
      for (const k of Object.keys(series)) gapSeries[k].push(null);
    }
    gapXs.push(x);
    for (const k of Object.keys(series)) gapSeries[k].push(series[k][i]);
  });
  return [gapXs, gapSeries];
}

function isolated(u, seriesIdx, show) {
  if (show) return null;
  const ys = u.data[seriesIdx];
  const found = [];
  ys.forEach((y, i) => {
    if (y != null && ys[i - 1] == null && ys[i + 1] == null) found.push(i);
  });
  return found.length ? found : null;
}

// Horizontal reference lines (thresholds) and vertical marks (changes, alerts), drawn over
// the plot with their labels.
function drawOverlays(u, lines, marks) {
  const { ctx } = u;
  const { left, top, width, height } = u.bbox;
  const px = devicePixelRatio;
  ctx.save();
  ctx.font = `${11 * px}px system-ui, sans-serif`;
  ctx.lineWidth = px;
  const labelled = [];
  for (const line of lines) {
    const y = Math.round(u.valToPos(line.value, "y", true));
    if (y < top || y > top + height) continue;
    const crowded = labelled.some((other) => Math.abs(other - y) < 12 * px);
    ctx.strokeStyle = ctx.fillStyle = line.color ?? "#dc2626";
    ctx.setLineDash([6 * px, 4 * px]);
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + width, y);
    ctx.stroke();
    if (crowded) continue;
    labelled.push(y);
    ctx.textAlign = "left";
    ctx.fillText(line.label, left + 4 * px, y - 4 * px);
  }
  // marks closer than a few pixels share one line and one label ("… +2")
  const clusters = [];
  for (const mark of marks) {
    const x = Math.round(u.valToPos(mark.t, "x", true));
    if (x < left || x > left + width) continue;
    const last = clusters[clusters.length - 1];
    if (last && x - last.x < 6 * px) last.more += 1;
    else clusters.push({ x, mark, more: 0 });
  }
  clusters.forEach(({ x, mark, more }, i) => {
    ctx.strokeStyle = ctx.fillStyle = mark.color ?? "#6b7280";
    ctx.setLineDash([2 * px, 3 * px]);
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + height);
    ctx.stroke();
    ctx.textAlign = x > left + width / 2 ? "right" : "left";
    const label = mark.label.length > 28 ? `${mark.label.slice(0, 27)}…` : mark.label;
    const text = more ? `${label} +${more}` : label;
    ctx.fillText(text, x + (ctx.textAlign === "left" ? 3 : -3) * px, top + (12 + 12 * (i % 3)) * px);
  });
  ctx.restore();
}

// Time ticks on one line, as precise as their spacing needs (uPlot's default puts a date
// under the first tick, which collides with the next label on a narrow chart).
function timeTicks(u, splits) {
  const step = splits.length > 1 ? splits[1] - splits[0] : 60;
  const parts = step < 60 ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
    : step < 86400 ? { hour: "2-digit", minute: "2-digit" }
      : { month: "short", day: "numeric" };
  const clock = new Intl.DateTimeFormat(undefined, parts);
  return splits.map((t) => clock.format(new Date(t * 1000)));
}

// A small SVG line of values (nulls break it), with a dashed zero line when it crosses zero.
export function sparkline(values, { width = 120, height = 28 } = {}) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const known = values.filter((v) => v != null);
  if (!known.length) return svg;
  const lo = Math.min(0, ...known);
  const hi = Math.max(1, ...known);
  const y = (v) => height - 2 - ((v - lo) / (hi - lo || 1)) * (height - 4);
  const x = (i) => (values.length > 1 ? (i * width) / (values.length - 1) : width / 2);
  if (lo < 0) {
    const zero = document.createElementNS(ns, "line");
    Object.entries({ x1: 0, x2: width, y1: y(0), y2: y(0), class: "zero" }).forEach(([k, v]) => zero.setAttribute(k, String(v)));
    svg.append(zero);
  }
  let path = "";
  let last = 0;
  values.forEach((v, i) => {
    if (v == null) return;
    // a lone point is a zero-length segment, which round caps draw as a dot
    const lone = values[i - 1] == null && values[i + 1] == null;
    path += `${i > 0 && values[i - 1] != null ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}${lone ? "l0,0" : ""}`;
    last = i;
  });
  const bad = known[known.length - 1] <= 0;
  const line = document.createElementNS(ns, "path");
  line.setAttribute("d", path);
  line.setAttribute("class", bad ? "line bad" : "line");
  const now = document.createElementNS(ns, "circle");
  Object.entries({ cx: x(last), cy: y(values[last]), r: 2.5, class: bad ? "now bad" : "now" }).forEach(([k, v]) => now.setAttribute(k, String(v)));
  svg.append(line, now);
  return svg;
}

export class TimeChart {
  // `format` turns a value into axis/legend text; `span()` is the window shown, in seconds,
  // ending now (or at the newest point, should the agents' clocks run ahead). `lines` are
  // thresholds ({value, label, color}) kept in view; `marks` ({t, label, color}) annotate
  // moments; `step` (seconds between points) makes missing points gaps.
  constructor(container, { title, span, format = (v) => v.toFixed(1), height = 220, lines = [], step = null }) {
    this.panel = document.createElement("section");
    this.panel.className = "panel";
    const heading = document.createElement("h2");
    heading.textContent = title;
    this.panel.append(heading);
    this.body = document.createElement("div");
    this.panel.append(this.body);
    container.append(this.panel);
    this.format = format;
    this.span = span;
    this.height = height;
    this.labels = null;
    this.plot = null;
    this.lines = lines;
    this.marks = [];
    this.step = step;
    this.version = 0;
    new ResizeObserver(() => this.resize()).observe(this.panel);
  }

  width() {
    return Math.max(240, this.body.clientWidth || 480);
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: this.height });
  }

  // xs: Unix seconds; series: {label: [value|null, ...]} aligned with xs.
  update(rawXs, rawSeries) {
    const [xs, series] = withGaps(rawXs, rawSeries, this.step);
    const labels = Object.keys(series);
    const data = [xs, ...labels.map((label) => series[label])];
    if (!this.plot || labels.join("\u0000") !== this.labels) {
      this.labels = labels.join("\u0000");
      if (this.plot) this.plot.destroy();
      const format = this.format;
      this.plot = new uPlot(
        {
          width: this.width(),
          height: this.height,
          series: [
            {},
            ...labels.map((label, i) => ({
              label,
              stroke: PALETTE[i % PALETTE.length],
              width: 1.5,
              spanGaps: false,
              // few points, or a point with gaps on both sides, would be invisible as a line
              points: { show: (u) => u.data[0].length < 60, size: 5, filter: isolated },
              value: (u, v) => (v == null ? "–" : format(v)),
            })),
          ],
          axes: [{ values: timeTicks, space: 80 }, { values: (u, ticks) => ticks.map((v) => format(v)), size: axisSize }],
          hooks: { draw: [(u) => drawOverlays(u, this.lines, this.marks)] },
          scales: {
            // thresholds stay in view even when every value is far below them
            y: {
              range: (u, min, max) => {
                const lines = this.lines.map((l) => l.value);
                const data = [min, max].filter((v) => v != null && Number.isFinite(v));
                const values = [...data, ...lines, ...(data.length || lines.length ? [] : [1])];
                const lo = Math.min(0, ...values);
                const hi = Math.max(...values);
                return hi > lo ? [lo, hi + (hi - lo) * 0.08] : [lo, lo + 1];
              },
            },
            x: {
              time: true,
              // from the data, not uPlot's min/max: it pads a lone point by years
              range: (u) => {
                const xs = u.data[0];
                const end = Math.max(Date.now() / 1000, xs.length ? xs[xs.length - 1] : 0);
                return [end - this.span(), end];
              },
            },
          },
        },
        data,
        this.body,
      );
    } else {
      this.plot.setData(data);
    }
    this.version += 1;
    this.panel.classList.toggle("empty", !labels.some((label) => series[label].some((v) => v != null)));
    this.panel.dataset.points = String(rawXs.length);
    this.panel.dataset.lines = String(this.lines.length);
    this.panel.dataset.marks = String(this.marks.length);
    this.panel.dataset.version = String(this.version);
  }
}

// Points sorted by t, newest last; a delta replaces a point of the same t and is dropped
// when older than what is already there (a late duplicate).
export function mergePoint(points, point, keepSeconds) {
  const last = points[points.length - 1];
  if (last && point.t < last.t) return points;
  if (last && point.t === last.t) points[points.length - 1] = point;
  else points.push(point);
  const oldest = point.t - keepSeconds;
  while (points.length && points[0].t < oldest) points.shift();
  return points;
}
