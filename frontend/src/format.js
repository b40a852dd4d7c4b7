// Number formatting shared by the pages.
// Durations in the unit that reads best: 850 µs, 12.3 ms, 250 ms, 1.25 s.
export function duration(seconds) {
  if (seconds == null) return "–";
  const abs = Math.abs(seconds);
  if (abs === 0) return "0 ms";
  if (abs < 0.001) return `${(seconds * 1e6).toFixed(0)} µs`;
  if (abs < 0.01) return `${(seconds * 1000).toFixed(2)} ms`;
  if (abs < 0.1) return `${(seconds * 1000).toFixed(1)} ms`;
  if (abs < 1) return `${(seconds * 1000).toFixed(0)} ms`;
  return `${seconds.toFixed(abs < 10 ? 2 : 1)} s`;
}
// Ratios as percentages with the digits an objective needs (99.95 %), budgets may be negative.
export function ratio(v, digits = 2) {
  if (v == null) return "–";
  const p = v * 100;
  return `${Math.abs(p) >= 1000 ? p.toFixed(0) : p.toFixed(digits)} %`;
}
export const rate = (v) => (v == null ? "–" : `${v >= 100 ? v.toFixed(0) : v.toFixed(1)}×`);
export const count = (v) => (v == null ? "–" : Number(v).toLocaleString("en-US"));
export const when = (t) => (t == null ? "–" : new Date(t * 1000).toISOString().slice(0, 16).replace("T", " "));
export const num = (v, digits = 1) => (v == null ? "–" : Number(v).toFixed(digits));
export const pct = (v) => (v == null ? "–" : `${Number(v).toFixed(0)} %`);
export const gib = (bytes) => (bytes == null ? "–" : `${(bytes / 2 ** 30).toFixed(1)} GiB`);

export function ago(t) {
  if (t == null) return "never";
  const seconds = Math.max(0, Date.now() / 1000 - t);
  if (seconds < 90) return `${seconds.toFixed(0)} s ago`;
  if (seconds < 5400) return `${(seconds / 60).toFixed(0)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

// Elements from a tag, attributes and children (strings become text nodes).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  node.append(...children.map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

// GPU indices present in some gauges ({"gpu.3.power_w": ...} -> [3]).
export function gpuIndices(gauges) {
  const found = new Set();
  for (const key of Object.keys(gauges)) {
    const match = /^gpu\.(\d+)\./.exec(key);
    if (match) found.add(Number(match[1]));
  }
  return [...found].sort((a, b) => a - b);
}

export function tile(label, value, attrs = {}) {
  return el("div", { class: "tile", ...attrs }, el("span", { class: "label" }, label), el("span", { class: "value" }, value));
}
