// The time-window picker shared by the pages that chart history.
import { el } from "../format.js";

export const WINDOWS = [
  [300, "5 min"],
  [3600, "1 h"],
  [21600, "6 h"],
  [86400, "24 h"],
  [604800, "7 d"],
];

export function windowPicker(initial, onChange) {
  const select = el("select", { "aria-label": "Window", class: "window" });
  for (const [seconds, label] of WINDOWS) {
    const option = el("option", { value: String(seconds) }, label);
    if (seconds === initial) option.selected = true;
    select.append(option);
  }
  select.addEventListener("change", () => onChange(Number(select.value)));
  return select;
}
