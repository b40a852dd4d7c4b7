// Live dashboards: load the REST snapshot, then apply WebSocket deltas. Channel layers may
// drop messages and connections drop, so after every reconnect (and every few minutes)
// the page reloads its snapshot and subscribes again: it heals itself.
import { getJSON } from "./api.js";

const BACKOFF_START_MS = 500;
const BACKOFF_CAP_MS = 10000;
const RESYNC_MS = 120000;

function socketUrl() {
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${window.location.host}/ws/dashboard/`;
}

class Indicator {
  constructor(element) {
    this.element = element;
  }

  set(state, text) {
    if (!this.element) return;
    this.element.dataset.state = state;
    this.element.textContent = text;
  }
}

// A second snapshot a page shows beside its own (the tenant's SLOs, the fleet's health):
// loaded now and every `everyMs`; a failed load keeps what is drawn.
export function follow(url, everyMs, onData) {
  const load = () => getJSON(url).then(onData).catch((error) => console.error(error));
  load();
  window.setInterval(load, everyMs);
}

// One page's live view. `page` has:
//   snapshotUrl()            where to GET the snapshot (may depend on the window)
//   streams(snapshot)        stream names to subscribe to, given the snapshot
//   render(snapshot)         draw everything from a snapshot
//   apply(delta)             fold one delta ({..., stream}) into what is drawn
//   refreshMs (optional)     reload the snapshot this often: figures over the whole window
//                            (percentiles) cannot be folded from per-second deltas
export function runDashboard(page) {
  const indicator = new Indicator(document.getElementById("conn-state"));
  let socket = null;
  let attempt = 0;
  let snapshot = null;
  let loading = null;

  async function reload() {
    if (!loading) {
      loading = getJSON(page.snapshotUrl())
        .then((data) => {
          snapshot = data;
          page.render(data);
          subscribe(page.streams(data));
          return data;
        })
        .finally(() => {
          loading = null;
        });
    }
    return loading;
  }

  const subscribed = new Set();

  function subscribe(streams) {
    for (const stream of streams) {
      if (socket && socket.readyState === WebSocket.OPEN && !subscribed.has(stream)) {
        socket.send(JSON.stringify({ subscribe: stream }));
        subscribed.add(stream);
      }
    }
  }

  function scheduleReconnect() {
    const delay = Math.min(BACKOFF_CAP_MS, BACKOFF_START_MS * 2 ** attempt);
    const jittered = Math.round(delay * (0.5 + Math.random() / 2));
    attempt += 1;
    indicator.set("down", `reconnecting in ${Math.ceil(jittered / 1000)} s`);
    window.setTimeout(connect, jittered);
  }

  function connect() {
    indicator.set("connecting", "connecting");
    const ws = new WebSocket(socketUrl());
    socket = ws;
    subscribed.clear();
    ws.addEventListener("open", async () => {
      try {
        // A fresh snapshot on every (re)connection covers whatever was missed meanwhile.
        const data = attempt === 0 && snapshot ? snapshot : await reload();
        attempt = 0;
        subscribe(page.streams(data));
        indicator.set("live", "live");
      } catch (error) {
        console.error(error);
        ws.close();
      }
    });
    ws.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "subscribed") return;
      if (message.type === "error") {
        console.warn(`stream ${message.stream}: ${message.detail}`);
        return;
      }
      if (snapshot) page.apply(message);
    });
    ws.addEventListener("close", () => {
      if (socket === ws) {
        socket = null;
        scheduleReconnect();
      }
    });
  }

  // Pages reload when a delta names something the snapshot lacked, or the window changes.
  page.reload = () => reload().catch((error) => console.error(error));

  reload()
    .catch((error) => {
      console.error(error);
      indicator.set("down", "snapshot failed");
    })
    .finally(connect);
  window.setInterval(() => {
    reload().catch((error) => console.error(error));
  }, page.refreshMs ?? RESYNC_MS);
}
