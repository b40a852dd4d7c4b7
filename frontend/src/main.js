// The console's entry point: picks the page module named by #dashboard[data-page].
import "./console.css";
import { runDashboard } from "./live.js";
import { deploymentPage } from "./pages/deployment.js";
import { fleetPage } from "./pages/fleet.js";
import { nodePage } from "./pages/node.js";
import { sloPage } from "./pages/slo.js";
import { slosPage } from "./pages/slos.js";
import { storagePage } from "./pages/storage.js";
import { tenantPage } from "./pages/tenant.js";

const PAGES = {
  fleet: fleetPage,
  node: nodePage,
  deployment: deploymentPage,
  storage: storagePage,
  tenant: tenantPage,
  slos: slosPage,
  slo: sloPage,
};

const root = document.getElementById("dashboard");
if (root) {
  const context = {
    snapshot: root.dataset.snapshot,
    consoleUrl: root.dataset.console,
    platformAdmin: root.dataset.platformAdmin === "true",
    slos: root.dataset.slos,
    health: root.dataset.health,
    report: root.dataset.report,
    streams: JSON.parse(document.getElementById("dashboard-streams").textContent),
    thresholds: JSON.parse(document.getElementById("dashboard-thresholds").textContent),
  };
  root.replaceChildren();
  runDashboard(PAGES[root.dataset.page](root, context));
}
