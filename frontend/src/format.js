// Number formatting shared by the pages.
export const ms = (seconds) => (seconds == null ? "–" : `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`);
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
