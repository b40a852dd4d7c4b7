// Tenant: its SLOs first (worst first), then every deployment serving the tenant (its own and those shared with it) with the
// tenant's own latest latency, throughput and errors on it. A shared deployment's own page
// is its owner's, so only the tenant's own deployments link there.
import { duration, el, num, tile } from "../format.js";
import { follow } from "../live.js";
import { sloTable } from "./slotable.js";

export function tenantPage(root, context) {
  let deployments = new Map();
  let tenantId = null;
  const tiles = el("div", { class: "tiles" });
  const body = el("tbody");
  const headers = ["Deployment", "Model", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "tokens/s", "Queue", "Completed", "Errors"];
  const slos = sloTable(context.consoleUrl, { showTenant: false });
  slos.id = "slo-table";
  const report = el("a", { href: context.report }, "SLO report →");
  root.append(el("h2", {}, "Service level objectives ", report), slos, el("h2", {}, "Deployments"));
  follow(context.slos, 5000, (snapshot) => slos.update(snapshot.slos));
  root.append(tiles, el("table", { class: "grid", id: "tenant-table" }, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))), body));

  function draw() {
    const rows = [...deployments.values()].sort((a, b) => a.name.localeCompare(b.name));
    let tokens = 0;
    let errors = 0;
    body.replaceChildren(...rows.map((d) => {
      const p = d.latest;
      const failed = d.summary.usage.failed + d.summary.usage.rejected;
      tokens += p.tokens_per_s;
      errors += failed;
      return el(
        "tr", { dataset: { deployment: d.id } },
        el("td", {}, d.tenant === tenantId
          ? el("a", { href: `${context.consoleUrl}deployments/${d.id}/` }, d.name)
          : el("span", { title: "shared with this tenant" }, `${d.name} (shared)`)),
        el("td", {}, d.model_name),
        el("td", {}, duration(p.latency.ttft?.p50)),
        el("td", {}, duration(p.latency.ttft?.p99)),
        el("td", {}, duration(p.latency.tpot?.p50)),
        el("td", {}, duration(p.latency.tpot?.p99)),
        el("td", {}, num(p.tokens_per_s, 0)),
        el("td", {}, num(p.queue_depth, 0)),
        el("td", {}, String(d.summary.usage.completed)),
        el("td", { class: failed ? "bad" : null }, String(failed)),
      );
    }));
    tiles.replaceChildren(
      tile("deployments", String(rows.length)),
      tile("tokens/s", num(tokens, 0)),
      tile("errors", String(errors)),
    );
  }

  const page = {
    snapshotUrl: () => context.snapshot,
    streams: () => context.streams,
    render(snapshot) {
      tenantId = snapshot.tenant.id;
      deployments = new Map(snapshot.deployments.map((d) => [d.id, { ...d, latest: d.summary }]));
      draw();
    },
    apply(delta) {
      if (delta.type !== "tenant.delta") return;
      for (const [id, point] of Object.entries(delta.deployments)) {
        const d = deployments.get(id);
        if (!d) {
          page.reload();
          return;
        }
        d.latest = point;
        for (const [name, value] of Object.entries(point.usage)) d.summary.usage[name] += value;
      }
      draw();
    },
  };
  return page;
}
