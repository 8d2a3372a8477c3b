// The live map (`/`) and the embed page (`/embed`): Leaflet, vehicles drawn on one canvas,
// a feed that follows the view. `window.trackerMap` exposes the state to tests.

import { areaFromQuery, bboxQuery, boundsOf, cellsOf, cellToBoundary, estimatedCells } from "./area.js";
import { FeedClient } from "./feed-client.js";
import { installHistory } from "./history.js";

const L = window.L;
const embed = document.body.dataset.embed === "true";
const params = new URLSearchParams(location.search);
const token = params.get("token");
const fixedArea = embed ? areaFromQuery(params) : null; // an embed shows what it was given
const config = await (await fetch("/web/config.json")).json();

const map = L.map("map", { zoomControl: !embed, worldCopyJump: false, minZoom: 3 });
if (config.tile_url) {
  L.tileLayer(config.tile_url, { attribution: config.tile_attribution, maxZoom: 19 }).addTo(map);
}
const start = areaFromQuery(params);
if (start) map.fitBounds(boundsOf(start));
else map.setView(config.map_center, config.map_zoom);

// --- vehicles on a canvas ---------------------------------------------------------------

const COLORS = { van: "#2563eb", truck: "#c2410c", stale: "#9aa5b1" };

const VehicleLayer = L.Layer.extend({
  onAdd(leafletMap) {
    this._canvas = L.DomUtil.create("canvas", "vehicles leaflet-zoom-hide");
    leafletMap.getPanes().overlayPane.appendChild(this._canvas);
    leafletMap.on("move zoom resize viewreset", this.redraw, this);
    this.redraw();
  },
  onRemove(leafletMap) {
    this._canvas.remove();
    leafletMap.off("move zoom resize viewreset", this.redraw, this);
  },
  redraw() {
    if (this._frame) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      this._draw();
    });
  },
  _draw() {
    const size = map.getSize();
    const ratio = window.devicePixelRatio || 1;
    const canvas = this._canvas;
    if (canvas.width !== size.x * ratio || canvas.height !== size.y * ratio) {
      canvas.width = size.x * ratio; // reallocates the bitmap: only when the size changes
      canvas.height = size.y * ratio;
      canvas.style.width = `${size.x}px`;
      canvas.style.height = `${size.y}px`;
    }
    L.DomUtil.setPosition(canvas, map.containerPointToLayerPoint([0, 0]));
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    if (!feed) return;
    // Web Mercator by hand: Leaflet's per-point projection allocates, and this loop is
    // the whole cost of a frame at 10,000 vehicles.
    const scale = 256 * 2 ** map.getZoom();
    const corner = map.containerPointToLayerPoint([0, 0]);
    const origin = map.getPixelOrigin();
    const ox = origin.x + corner.x;
    const oy = origin.y + corner.y;
    const zoom = map.getZoom();
    const r = zoom >= 15 ? 6 : zoom >= 13 ? 4.5 : 3;
    // Colour by colour, so the fill style changes three times a frame, not per vehicle.
    const groups = { van: [], truck: [], stale: [] };
    for (const v of feed.table.vehicles.values()) {
      groups[v.stale ? "stale" : v.id.startsWith("truck") ? "truck" : "van"].push(v);
    }
    for (const [kind, group] of Object.entries(groups)) {
      ctx.fillStyle = COLORS[kind];
      for (const v of group) {
        const x = ((v.lon + 180) / 360) * scale - ox;
        const sinLat = Math.sin((v.lat * Math.PI) / 180);
        const y = (0.5 - Math.log((1 + sinLat) / (1 - sinLat)) / (4 * Math.PI)) * scale - oy;
        if (x < -r || y < -r || x > size.x + r || y > size.y + r) continue;
        ctx.beginPath();
        if (v.heading === null) {
          ctx.arc(x, y, r * 0.8, 0, 2 * Math.PI);
        } else {
          const a = (v.heading * Math.PI) / 180; // clockwise from north
          const sin = Math.sin(a);
          const cos = Math.cos(a);
          ctx.moveTo(x + sin * r * 1.6, y - cos * r * 1.6);
          ctx.lineTo(x - sin * r - cos * r, y + cos * r - sin * r);
          ctx.lineTo(x - sin * r * 0.4, y + cos * r * 0.4);
          ctx.lineTo(x - sin * r + cos * r, y + cos * r + sin * r);
          ctx.closePath();
        }
        ctx.fill();
      }
    }
  },
});
const vehicleLayer = new VehicleLayer().addTo(map);

// Click a vehicle: id, speed, heading, last seen.
map.on("click", (e) => {
  if (!feed) return;
  let best = null;
  let bestDistance = 12;
  for (const v of feed.table.vehicles.values()) {
    const d = map.latLngToContainerPoint([v.lat, v.lon]).distanceTo(e.containerPoint);
    if (d < bestDistance) [best, bestDistance] = [v, d];
  }
  if (!best) return;
  historyTools?.vehicleClicked(best);
  const age = Math.max(0, Date.now() / 1000 - best.ts);
  const rows = [
    ["vehicle", best.id],
    ["speed", best.speed === null ? "not reported" : `${(best.speed * 3.6).toFixed(0)} km/h`],
    ["heading", best.heading === null ? "not reported" : `${best.heading.toFixed(0)}°`],
    ["last seen", `${age.toFixed(0)} s ago${best.stale ? " (stale)" : ""}`],
  ];
  const table = document.createElement("table");
  table.className = "vehicle-popup";
  for (const [name, value] of rows) {
    const row = table.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = value;
  }
  L.popup().setLatLng([best.lat, best.lon]).setContent(table).openOn(map);
});

// --- the feed follows the view ------------------------------------------------------------

let feed = null;
let area = null;
const cellLayer = L.layerGroup().addTo(map);
const showCells = document.getElementById("show-cells");

// Trails, day tracks and replay (web/history.js); the embed shows the live fleet only.
const historyTools = embed ? null : installHistory({ map, token, area: () => area, resubscribe: subscribe });

function feedUrl(query) {
  const search = new URLSearchParams({ ...query, ...historyTools?.feedParams() });
  if (token) search.set("token", token);
  return `/feed?${search}`;
}

function subscribe() {
  area = fixedArea ?? bboxQuery(map.getBounds());
  if (estimatedCells(area, config.h3_resolution) > config.max_feed_cells) {
    notice("zoom in to see vehicles: this view is larger than one feed may cover");
    area = null;
    drawCells();
    return;
  }
  notice("");
  if (feed) feed.setUrl(feedUrl(area));
  else startFeed(feedUrl(area));
  if (!embed) {
    const page = new URLSearchParams(area);
    if (token) page.set("token", token);
    history.replaceState(null, "", `?${page}`);
  }
  drawCells();
}

function startFeed(url) {
  feed = new FeedClient(url);
  feed.onUpdate(() => vehicleLayer.redraw());
  feed.onState(showState);
  showState(feed.state);
  historyTools?.attach(feed);
}

function drawCells() {
  cellLayer.clearLayers();
  if (!showCells?.checked || !area) return;
  const cells = cellsOf(area, config.h3_resolution).slice(0, 3000);
  for (const cell of cells) {
    L.polygon(cellToBoundary(cell), {
      color: "#7c3aed", weight: 1, fill: false, interactive: false,
    }).addTo(cellLayer);
  }
}

let pending = null;
map.on("moveend", () => {
  clearTimeout(pending);
  pending = setTimeout(subscribe, 250); // debounced: one switch per gesture
});
showCells?.addEventListener("change", drawCells);
subscribe();

// --- status ---------------------------------------------------------------------------------

function showState(state) {
  for (const el of document.querySelectorAll(".state")) {
    el.dataset.state = state;
    el.querySelector(".text").textContent = state;
  }
}

function notice(text) {
  const el = document.getElementById("notice");
  if (el) el.textContent = text;
}

function formatBytes(n) {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} kB` : `${n.toFixed(0)} B`;
}

function vehiclesInView() {
  if (!feed) return 0;
  const bounds = map.getBounds();
  let count = 0;
  for (const v of feed.table.vehicles.values()) if (bounds.contains([v.lat, v.lon])) count++;
  return count;
}

if (!embed) {
  setInterval(() => {
    document.getElementById("in-view").textContent = vehiclesInView().toLocaleString("en");
    document.getElementById("updates").textContent = (feed?.stats.updatesPerSecond ?? 0).toFixed(0);
    document.getElementById("bytes").textContent = formatBytes(feed?.stats.bytesPerSecond ?? 0);
  }, 1000);
}

window.trackerMap = {
  map,
  /** Draw now; the milliseconds it took (tests measure the canvas with 10,000 vehicles). */
  drawNow() {
    const started = performance.now();
    vehicleLayer._draw();
    return performance.now() - started;
  },
  get feed() {
    return feed;
  },
  get area() {
    return area;
  },
  vehiclesInView,
  history: historyTools,
};
