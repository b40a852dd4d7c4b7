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

export class TimeChart {
  // `format` turns a value into axis/legend text; `span()` is the window shown, in seconds,
  // ending now (or at the newest point, should the agents' clocks run ahead).
  constructor(container, { title, span, format = (v) => v.toFixed(1), height = 220 }) {
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
  update(xs, series) {
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
              spanGaps: true,
              points: { show: (u) => u.data[0].length < 60, size: 5 },
              value: (u, v) => (v == null ? "–" : format(v)),
            })),
          ],
          axes: [{}, { values: (u, ticks) => ticks.map((v) => format(v)), size: axisSize }],
          scales: {
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
    this.panel.dataset.points = String(xs.length);
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
