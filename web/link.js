// The tracking-link page: `/embed?token=<link>` on a phone. It follows the link's vehicle
// (the server moves the feed from cell to cell), says when its position was last updated,
// and says so when the link has expired or was revoked. `window.trackerLink` exposes the
// state to tests.

import { FeedClient } from "./feed-client.js";

const L = window.L;
const params = new URLSearchParams(location.search);
const token = params.get("token");
document.body.classList.add("link");
const card = document.getElementById("link-card");
card.hidden = false;
const [nameEl, detailEl, updatedEl] = ["name", "detail", "updated"].map((c) => card.querySelector(`.${c}`));

const map = L.map("map", { zoomControl: false, attributionControl: false, minZoom: 3 });
const config = await (await fetch("/web/config.json")).json();
if (config.tile_url) {
  L.tileLayer(config.tile_url, {
    attribution: config.tile_attribution,
    maxZoom: 19,
    referrerPolicy: "strict-origin",
  }).addTo(map);
}
map.setView(config.map_center, config.map_zoom);
new ResizeObserver(() => map.invalidateSize()).observe(document.getElementById("map"));

const icon = (stale) => L.divIcon({ className: stale ? "link-marker stale" : "link-marker", iconSize: [22, 22] });
const state = { state: "connecting", vehicle: null, lat: null, lon: null, ts: null, message: "", meta: null };
window.trackerLink = state;
let marker = null;
let seen = false;

const feedUrl = new URL("/feed", location.href);
for (const [name, value] of params) if (name !== "format") feedUrl.searchParams.append(name, value);
const feed = new FeedClient(feedUrl.href, { share: false });

function show(title, detail = "", updated = "") {
  nameEl.textContent = title;
  detailEl.textContent = detail;
  updatedEl.textContent = updated;
  state.message = [title, detail].filter(Boolean).join(" ");
}

function ago(seconds) {
  if (seconds < 5) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function title() {
  return state.meta?.name || state.vehicle || "Your delivery";
}

function render() {
  card.dataset.state = state.state;
  if (state.state === "ended") return; // the ending message stays
  if (state.ts === null) {
    show(title(), seen ? "The vehicle is outside the tracked area for now." : "Waiting for the vehicle's position…");
    return;
  }
  const updated = `Position updated ${ago(Date.now() / 1000 - state.ts)}`;
  const detail = state.state === "live" ? "" : "Reconnecting…";
  show(title(), detail, updated);
}

feed.onUpdate((changes, table) => {
  const [vehicle] = table.vehicles.values();
  if (!vehicle) {
    state.lat = state.lon = state.ts = null;
    marker?.remove();
    marker = null;
    render();
    return;
  }
  seen = true;
  state.vehicle = vehicle.id;
  Object.assign(state, { lat: vehicle.lat, lon: vehicle.lon, ts: vehicle.ts });
  const at = [vehicle.lat, vehicle.lon];
  if (!marker) {
    marker = L.marker(at, { icon: icon(vehicle.stale), keyboard: false }).addTo(map);
    map.setView(at, 15);
  } else {
    marker.setLatLng(at);
    marker.setIcon(icon(vehicle.stale));
    if (!map.getBounds().pad(-0.2).contains(at)) map.panTo(at);
  }
  if (state.vehicle && !state.meta) loadMeta(state.vehicle);
  render();
});

const ENDINGS = {
  token_expired: ["This tracking link has expired.", "Ask the sender for a new one if your delivery is still on its way."],
  token_revoked: ["This tracking link was revoked.", "The sender has turned it off."],
};

feed.onState((now) => {
  const problem = feed.problem;
  const ending = ENDINGS[problem?.error];
  if (ending && (now === "ended" || now === "offline")) {
    state.state = "ended";
    clearInterval(ticking);
    marker?.setIcon(icon(true));
    card.dataset.state = "ended";
    show(...ending);
    return;
  }
  state.state = now;
  if (now === "offline" && problem) {
    show("This tracking link cannot be shown.", problem.message || "");
    return;
  }
  render();
});

async function loadMeta(vehicle) {
  state.meta = {};
  try {
    const query = new URLSearchParams({ vehicles: vehicle, token });
    const response = await fetch(`/meta?${query}`, { cache: "no-store" });
    if (response.ok) state.meta = (await response.json())[vehicle] ?? {};
  } catch {
    // a name is a nicety: the page works without it
  }
  render();
}

const ticking = setInterval(render, 1000);
render();
