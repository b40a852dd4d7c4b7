// SLO overview: every visible SLO, worst first, reloaded every few seconds (budgets and burn
// rates are sums over long windows: a snapshot reload, not a delta, keeps them exact).
import { el, tile } from "../format.js";
import { STATE_TEXT, sloTable } from "./slotable.js";

export function slosPage(root, context) {
  const tiles = el("div", { class: "tiles" });
  const table = sloTable(context.consoleUrl, { showTenant: context.platformAdmin });
  table.id = "slo-table";
  root.append(tiles, table);
  return {
    snapshotUrl: () => context.snapshot,
    streams: () => [],
    refreshMs: 5000,
    render(snapshot) {
      tiles.replaceChildren(
        tile("SLOs", String(snapshot.slos.length)),
        ...Object.entries(STATE_TEXT).map(([state, [level, text]]) =>
          tile(text, String(snapshot.counts[state]), { class: snapshot.counts[state] && level === "bad" ? "tile bad" : "tile", id: `tile-${state}` })),
      );
      table.update(snapshot.slos);
    },
    apply() {},
  };
}
