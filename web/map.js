// The live map (`/`) and the embed page (`/embed`): Leaflet, the streets and the vehicles
// drawn on canvases, a feed that follows the view (or the followed vehicle), and why it is
// offline when the server refuses it. `window.trackerMap` exposes the state to tests.

import { areaFromQuery, bboxQuery, boundsOf, cellsOf, cellToBoundary, estimatedCells } from "./area.js";
import { FeedClient } from "./feed-client.js";
import { installAlerts } from "./alerts.js";
import { installHistory } from "./history.js";
import { VehicleMeta } from "./meta.js";
import { createPanel, explainRefusal } from "./panel.js";
import { installZones } from "./zones.js";

const L = window.L;
const embed = document.body.dataset.embed === "true";
const params = new URLSearchParams(location.search);
const token = params.get("token");
const fixedArea = embed ? areaFromQuery(params) : null; // an embed shows what it was given
const config = await (await fetch("/web/config.json")).json();

const map = L.map("map", { zoomControl: !embed, worldCopyJump: false, minZoom: 3 });
if (config.tile_url) {
  L.tileLayer(config.tile_url, {
    attribution: config.tile_attribution,
    maxZoom: 19,
    // Tile servers (OpenStreetMap's among them) want a Referer; the page's own policy
    // sends none, as its URL may carry a token. The origin alone is enough.
    referrerPolicy: "strict-origin",
  }).addTo(map);
}
const start = areaFromQuery(params);
if (start) map.fitBounds(boundsOf(start));
else map.setView(config.map_center, config.map_zoom);
// The map's box changes size without a window resize (the status strip wraps, the panel
// opens): tell Leaflet, or it keeps drawing for the old size.
new ResizeObserver(() => map.invalidateSize()).observe(document.getElementById("map"));

// --- streets under the vehicles (GeoJSON served by the tracker, no tiles needed) ------------

let streets = null;
if (config.streets_url) {
  map.createPane("streets").style.zIndex = 350; // above tiles (200), below vehicles (400)
  const renderer = L.canvas({ pane: "streets", padding: 0.5 });
  fetch(config.streets_url)
    .then((response) => response.json())
    .then((collection) => {
      streets = L.geoJSON(collection, {
        pane: "streets",
        renderer,
        interactive: false,
        style: (feature) =>
          feature.properties?.kind === "arterial"
            ? { color: "#fdf3c4", weight: 6, opacity: 1 }
            : { color: "#ffffff", weight: 3, opacity: 1 },
      }).addTo(map);
    })
    .catch(() => {}); // the map works without them
}

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
    const project = (v) => {
      const sinLat = Math.sin((v.lat * Math.PI) / 180);
      return [
        ((v.lon + 180) / 360) * scale - ox,
        (0.5 - Math.log((1 + sinLat) / (1 - sinLat)) / (4 * Math.PI)) * scale - oy,
      ];
    };
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
        const [x, y] = project(v);
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
    const followed = followedVehicle();
    if (followed) {
      const [x, y] = project(followed);
      ctx.strokeStyle = "#7c3aed";
      ctx.lineWidth = 3;
      ctx.beginPath();
      ctx.arc(x, y, r * 2.6, 0, 2 * Math.PI);
      ctx.stroke();
    }
  },
});
const vehicleLayer = new VehicleLayer().addTo(map);

// What each vehicle is (name, kind, plate): asked once per session, shown in popup and list.
const vehicleMeta = new VehicleMeta(token);

/** A vehicle's name, id, speed, heading and last seen, as rows of [name, value]. */
function describe(v) {
  const age = Math.max(0, (historyTools?.replayTime() ?? Date.now() / 1000) - v.ts);
  const meta = vehicleMeta.get(v.id);
  const about = [meta?.name && ["name", meta.name], meta?.kind && ["kind", meta.kind], meta?.plate && ["plate", meta.plate]];
  return [
    ...about.filter(Boolean),
    ["vehicle", v.id],
    ["speed", v.speed === null ? "not reported" : `${(v.speed * 3.6).toFixed(0)} km/h`],
    ["heading", v.heading === null ? "not reported" : `${v.heading.toFixed(0)}°`],
    ["last seen", `${age.toFixed(0)} s ago${v.stale ? " (stale)" : ""}`],
  ];
}

// Click a vehicle: id, speed, heading, last seen, and (on the map page) follow it.
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
  const box = document.createElement("div");
  const table = document.createElement("table");
  table.className = "vehicle-popup";
  const fill = () => {
    table.replaceChildren();
    for (const [name, value] of describe(best)) {
      const row = table.insertRow();
      row.insertCell().textContent = name;
      row.insertCell().textContent = value;
    }
  };
  fill();
  vehicleMeta.onChange = fill; // its name may arrive after the click (asked once)
  box.append(table);
  if (!embed) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "follow";
    button.addEventListener("click", () => follow(best.id, best));
    box.append(button);
  }
  L.popup().setLatLng([best.lat, best.lon]).setContent(box).openOn(map);
});

// --- the feed follows the view, or the followed vehicle ------------------------------------

let feed = null;
let area = null;
const cellLayer = L.layerGroup().addTo(map);
const showCells = document.getElementById("show-cells");

// The latest zone events, live (web/alerts.js); not in the embed.
if (!embed) installAlerts({ map, token });

// Trails, day tracks and replay (web/history.js); the embed shows the live fleet only.
const historyTools = embed ? null : installHistory({ map, token, area: () => area, resubscribe: subscribe });
// Zones with their names, and the zone editor (web/zones.js); not in the embed.
const zoneTools = embed ? null : installZones({ map, token });

function feedUrl(query) {
  const search = new URLSearchParams({ ...query, ...historyTools?.feedParams() });
  if (token) search.set("token", token);
  return `/feed?${search}`;
}

function subscribe() {
  const view = map.getBounds();
  // Following, the feed covers twice the view around the vehicle and is kept while the
  // view stays inside it: the map re-centres every tick, the feed switches now and then.
  if (following && area?.bbox && L.latLngBounds(boundsOf(area)).contains(view)) return;
  const wanted = fixedArea ?? bboxQuery(following ? view.pad(0.5) : view);
  if (estimatedCells(wanted, config.h3_resolution) > config.max_feed_cells) {
    pause("zoom in to see vehicles: this view is larger than one feed may cover");
    return;
  }
  area = wanted;
  notice("");
  if (feed) feed.setUrl(feedUrl(area));
  else startFeed(feedUrl(area));
  if (!embed) rememberView();
  drawCells();
}

/** The page's URL reopens this view: its area (and the followed vehicle). */
function rememberView() {
  // Following, the feed's area is larger than the view: the link keeps the view.
  const page = new URLSearchParams(area ? (following ? bboxQuery(map.getBounds()) : area) : {});
  if (following) page.set("follow", following);
  if (token) page.set("token", token);
  const query = page.toString();
  history.replaceState(null, "", query ? `?${query}` : location.pathname);
}

/** Too large a view: no feed, no vehicles, no area in the URL, and say why. */
function pause(why) {
  area = null;
  if (feed) {
    feed.close();
    feed = null;
  }
  vehicleLayer.redraw();
  showState("paused", null);
  notice(why);
  if (!embed) rememberView();
  drawCells();
}

function startFeed(url) {
  feed = new FeedClient(url);
  const current = feed;
  feed.onUpdate(() => {
    if (current !== feed) return;
    vehicleLayer.redraw();
    keepFollowing();
  });
  feed.onState((state, problem) => current === feed && showState(state, problem));
  showState(feed.state, feed.problem);
  historyTools?.attach(feed);
}

function drawCells() {
  cellLayer.clearLayers();
  if (!showCells?.checked || !area) return;
  const cells = cellsOf(area, config.h3_resolution).slice(0, 3000);
  for (const cell of cells) {
    L.polygon(cellToBoundary(cell), {
      color: "#7c3aed", weight: 1, fill: false, interactive: false, className: "h3-cell",
    }).addTo(cellLayer);
  }
}

let pending = null;
map.on("moveend", () => {
  clearTimeout(pending);
  pending = setTimeout(subscribe, 250); // debounced: one switch per gesture
});
showCells?.addEventListener("change", drawCells);

// --- follow one vehicle ------------------------------------------------------------------

let following = null; // the followed vehicle's id
let followedVid = null; // its number in the current feed's table, once seen
let lostSince = null;
const LOST_AFTER_MS = 3000; // not in the feed this long: ask the server where it is

function followedVehicle() {
  if (!following || !feed) return null;
  const known = feed.table.vehicles.get(followedVid);
  if (known?.id === following) return known;
  for (const v of feed.table.vehicles.values()) {
    if (v.id === following) {
      followedVid = v.vid;
      return v;
    }
  }
  return null;
}

/** Keep the followed vehicle centred; if it is not in the feed, ask where it went. */
function keepFollowing() {
  if (!following) return;
  const v = followedVehicle();
  if (v) {
    lostSince = null;
    map.panTo([v.lat, v.lon], { animate: false });
    return;
  }
  lostSince ??= performance.now();
  if (performance.now() - lostSince > LOST_AFTER_MS) {
    lostSince = performance.now();
    panel?.find(following);
  }
}

/** Follow vehicle `id`, at `where` (a position the server or the feed gave). */
function follow(id, where) {
  following = id;
  followedVid = null;
  lostSince = null;
  map.closePopup();
  map.setView([where.lat, where.lon], Math.max(map.getZoom(), 15), { animate: false });
  area = null; // subscribe around the vehicle now
  subscribe();
  panel?.showFollowing(id);
  vehicleLayer.redraw();
}

function unfollow() {
  if (!following) return;
  following = null;
  panel?.showFollowing(null);
  subscribe();
}
map.on("dragstart", unfollow); // the user takes the map back

// --- status ---------------------------------------------------------------------------------

function showState(state, problem) {
  for (const el of document.querySelectorAll(".state")) {
    el.dataset.state = state;
    el.querySelector(".text").textContent = state;
  }
  const box = document.getElementById("problem");
  const help = problem ? explainRefusal(problem, { token, embed }) : null;
  box.hidden = !help;
  if (help) {
    box.querySelector(".title").textContent = help.title;
    box.querySelector(".todo").textContent = help.todo;
  }
}

function notice(text) {
  const el = document.getElementById("notice");
  if (el) el.textContent = text;
}

function formatBytes(n) {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} kB` : `${n.toFixed(0)} B`;
}

function inView() {
  if (!feed) return [];
  const bounds = map.getBounds();
  return [...feed.table.vehicles.values()].filter((v) => bounds.contains([v.lat, v.lon]));
}

const panel = embed
  ? null
  : createPanel({ token, inView, follow, unfollow, meta: vehicleMeta, onProblem: (p) => showState("offline", p) });

if (!embed) {
  setInterval(() => {
    document.getElementById("in-view").textContent = inView().length.toLocaleString("en");
    document.getElementById("updates").textContent = (feed?.stats.updatesPerSecond ?? 0).toFixed(0);
    document.getElementById("bytes").textContent = formatBytes(feed?.stats.bytesPerSecond ?? 0);
    panel.refresh();
  }, 1000);
}

subscribe();
if (!embed && params.get("follow")) panel.find(params.get("follow")); // a link that follows

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
  get following() {
    return following;
  },
  get streets() {
    return streets;
  },
  follow,
  unfollow,
  vehiclesInView: () => inView().length,
  history: historyTools,
  zones: zoneTools,
};
