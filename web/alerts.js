// The alerts panel: the latest zone events (enter, exit, dwell, cross), live from
// GET /alerts (docs/alerts.md). The map (map.js) installs it once; it keeps its own
// EventSource, which resumes by itself with Last-Event-ID after a dropped connection.
// `window.trackerAlerts` exposes its state to tests.

const SHOWN = 30; // events listed at most (the newest first)
const BACKLOG = 20; // the newest events asked for when the panel opens
const ICONS = { enter: "→", exit: "←", dwell: "⏱", cross: "×" };

/**
 * Add the alerts panel to `map` (a Leaflet map).
 *
 * @param {{map: any, token: string | null}} options token: the page's feed token, if any
 *   (else the session cookie or open feeds decide).
 */
export function installAlerts({ map, token }) {
  const L = window.L;
  const box = L.DomUtil.create("div", "alerts-panel leaflet-bar");
  box.id = "alerts-panel";
  box.innerHTML = `
    <div class="alerts-head"><b>Alerts</b> <span id="alerts-state">connecting</span></div>
    <ol id="alerts-list" aria-live="polite"></ol>`;
  L.DomEvent.disableClickPropagation(box);
  L.DomEvent.disableScrollPropagation(box);
  const control = L.control({ position: "bottomleft" });
  control.onAdd = () => box;
  control.addTo(map);
  const list = box.querySelector("#alerts-list");
  const stateText = box.querySelector("#alerts-state");
  const markers = L.layerGroup().addTo(map);
  const state = { events: [], state: "connecting", gaps: 0 };
  window.trackerAlerts = state;

  const params = new URLSearchParams({ backlog: String(BACKLOG) });
  if (token) params.set("token", token);
  const source = new EventSource(`/alerts?${params}`);
  const show = (name) => {
    state.state = name;
    stateText.textContent = name;
    box.dataset.state = name;
  };
  source.addEventListener("open", () => show("live"));
  source.addEventListener("error", () => show(source.readyState === EventSource.CLOSED ? "unavailable" : "reconnecting"));
  source.addEventListener("shutdown", () => show("reconnecting"));
  source.addEventListener("gap", () => {
    state.gaps += 1; // events were deleted by retention before this page read them
  });
  source.addEventListener("alert", (message) => {
    const event = JSON.parse(message.data);
    state.events.unshift(event);
    state.events.length = Math.min(state.events.length, SHOWN);
    list.prepend(row(event));
    while (list.children.length > SHOWN) list.lastElementChild.remove();
    markers.clearLayers();
    for (const recent of state.events.slice(0, 5)) {
      L.circleMarker([recent.lat, recent.lon], { radius: 7, color: "#dc2626", weight: 2, fill: false, interactive: false }).addTo(markers);
    }
  });

  function row(event) {
    const item = document.createElement("li");
    item.className = `alert alert-${event.type}`;
    item.dataset.id = String(event.id);
    const time = new Date(event.t * 1000).toLocaleTimeString();
    const spent = event.type === "exit" && event.inside_s != null ? ` after ${Math.round(event.inside_s)} s` : "";
    const why = event.reason && event.reason !== "left" ? ` (${event.reason})` : "";
    // textContent only: ids and names come from devices and operators, never markup.
    item.textContent = `${time} ${ICONS[event.type] ?? ""} ${event.vehicle} ${event.type} ${event.zone}${spent}${why}`;
    item.title = `${event.kind} · event ${event.id}`;
    item.addEventListener("click", () => map.panTo([event.lat, event.lon]));
    return item;
  }

  return { source, state };
}
