// History on the map: trails behind vehicles, a vehicle's track for the day, and replay.
// See docs/history.md. The map (map.js) installs it once and asks it three things: the
// extra feed parameters while replaying (feedParams), to follow the feed (attach), and
// what to do when a vehicle is clicked (vehicleClicked). Everything else lives here.
//
// Replay needs nothing new from the feed client: a replay feed (`/feed?...&from=&speed=`)
// speaks the live wire format, so the map's table and canvas play it as they are.

const TRAIL_MINUTES = 15; // trails show this much of each vehicle's past
const TRAIL_STEP_S = 5; // at most one trail point per vehicle per this many seconds
const TRAIL_REDRAW_MS = 1000; // trails are redrawn at most this often
const HISTORY_PAGE = 20000; // positions per GET /history page
const HISTORY_PAGES = 10; // pages read for trails at most (the rest of the past is skipped)
const REPLAY_HOURS = 24; // how far back the slider reaches
const SPEEDS = [1, 10, 60, 300, 1000];
const TRAIL_STYLE = { color: "#475569", weight: 2, opacity: 0.55, interactive: false };
const TRACK_STYLE = { color: "#db2777", weight: 4, opacity: 0.85 };

/**
 * Add the history controls to `map` (a Leaflet map) and return the hooks map.js calls.
 *
 * @param {{map: any, token: string | null, area: () => object | null, resubscribe: () => void}} options
 *   area(): the feed query of the current view; resubscribe(): reopen the feed (it asks
 *   feedParams() for the replay's parameters).
 */
export function installHistory({ map, token, area, resubscribe }) {
  const L = window.L;
  const renderer = L.canvas({ padding: 0.2 });
  const trailLayer = L.layerGroup().addTo(map);
  const trackLayer = L.layerGroup().addTo(map);
  const trails = new Map(); // vehicle id -> {points: [[lat, lon]], times: [ts], line}
  let feed = null;
  let replay = null; // while replaying: {from, speed, startedAt (ms, wall clock), until}
  let mode = "live"; // live | replay | ended
  let trailTimer = null;
  let trailLoad = 0; // generation of the latest trail load: older answers are dropped

  // --- the controls -------------------------------------------------------------------------

  const panel = L.DomUtil.create("div", "history-controls leaflet-bar");
  panel.id = "history-controls";
  panel.innerHTML = `
    <label><input type="checkbox" id="show-trails"> trails (${TRAIL_MINUTES} min)</label>
    <div class="replay-row">
      <input type="range" id="replay-time" min="${-REPLAY_HOURS * 60}" max="-1" step="1" value="-60"
        aria-label="replay from">
      <span id="replay-from"></span>
    </div>
    <div class="replay-row">
      <select id="replay-speed" aria-label="replay speed">
        ${SPEEDS.map((s) => `<option value="${s}"${s === 60 ? " selected" : ""}>${s}×</option>`).join("")}
      </select>
      <button type="button" id="replay-play">replay</button>
      <button type="button" id="replay-live">live</button>
    </div>
    <div id="replay-clock"></div>
    <div id="history-notice"></div>`;
  L.DomEvent.disableClickPropagation(panel);
  L.DomEvent.disableScrollPropagation(panel);
  const control = L.control({ position: "topright" });
  control.onAdd = () => panel;
  control.addTo(map);
  const $ = (id) => panel.querySelector(`#${id}`);
  const slider = $("replay-time");
  const showTrails = $("show-trails");

  const showFrom = () => ($("replay-from").textContent = clock(Date.now() / 1000 + slider.value * 60));
  slider.addEventListener("input", showFrom);
  showFrom();
  $("replay-play").addEventListener("click", () => startReplay());
  $("replay-live").addEventListener("click", () => backToLive());
  $("replay-speed").addEventListener("change", () => {
    if (replay) startReplay(replayTime()); // go on from where it is, at the new speed
  });
  showTrails.addEventListener("change", () => (showTrails.checked ? loadTrails() : clearTrails()));
  map.on("moveend", () => {
    if (showTrails.checked && mode === "live") setTimeout(loadTrails, 300); // after map.js moved the feed
  });
  setMode("live");

  // --- replay -------------------------------------------------------------------------------

  function startReplay(from = Date.now() / 1000 + slider.value * 60) {
    const now = Date.now() / 1000;
    replay = { from, speed: Number($("replay-speed").value), startedAt: Date.now(), until: now };
    clearTrails();
    trackLayer.clearLayers();
    setMode("replay");
    resubscribe();
  }

  function backToLive() {
    replay = null;
    clearTrails();
    setMode("live");
    resubscribe();
    if (showTrails.checked) loadTrails();
  }

  /** The history time the replay has reached (Unix seconds), from the wall clock. */
  function replayTime() {
    if (!replay) return Date.now() / 1000;
    const t = replay.from + ((Date.now() - replay.startedAt) / 1000) * replay.speed;
    return Math.min(t, replay.until);
  }

  function setMode(next) {
    mode = next;
    panel.dataset.mode = next;
    $("replay-clock").textContent =
      next === "live" ? "live" : next === "ended" ? `replay ended at ${clock(replay.until)}` : "";
  }

  setInterval(() => {
    if (mode === "replay") $("replay-clock").textContent = `replay ${clock(replayTime())} · ${replay.speed}×`;
    else showFrom();
  }, 250);

  // --- trails -------------------------------------------------------------------------------

  function clearTrails() {
    trailLoad += 1;
    trails.clear();
    trailLayer.clearLayers();
  }

  /** Trails of the view's vehicles for the last minutes, from GET /history (JSON columns). */
  async function loadTrails() {
    const query = area();
    if (!query || !showTrails.checked) return;
    clearTrails();
    const generation = trailLoad;
    const to = Date.now() / 1000;
    const search = new URLSearchParams({ ...query, from: (to - TRAIL_MINUTES * 60).toFixed(3), to: to.toFixed(3) });
    search.set("limit", String(HISTORY_PAGE));
    if (token) search.set("token", token);
    try {
      for (let page = 0; page < HISTORY_PAGES; page++) {
        const answer = await getJSON(`/history?${search}`);
        if (generation !== trailLoad) return; // cleared or reloaded meanwhile
        for (const { vehicle_id: id, ts, lat, lon } of answer.vehicles ?? []) {
          for (let i = 0; i < ts.length; i++) addPoint(id, lat[i], lon[i], ts[i]);
        }
        if (!answer.cursor) break;
        search.set("cursor", answer.cursor);
      }
      notice("");
    } catch (error) {
      notice(`trails: ${error.message}`);
    }
    drawTrails();
  }

  function addPoint(id, lat, lon, ts) {
    let trail = trails.get(id);
    if (!trail) trails.set(id, (trail = { points: [], times: [], line: null }));
    const last = trail.times.length ? trail.times[trail.times.length - 1] : -Infinity;
    if (ts < last + TRAIL_STEP_S) return;
    trail.points.push([lat, lon]);
    trail.times.push(ts);
  }

  /** Extend trails from the feed (live or replayed): each changed vehicle's new position. */
  function follow(changes, table) {
    if (!showTrails.checked) return;
    for (const vid of changes.changed) {
      const v = table.vehicles.get(vid);
      if (v) addPoint(v.id, v.lat, v.lon, v.ts);
    }
    if (!trailTimer) trailTimer = setTimeout(drawTrails, TRAIL_REDRAW_MS);
  }

  function drawTrails() {
    clearTimeout(trailTimer);
    trailTimer = null;
    let newest = -Infinity;
    for (const trail of trails.values()) newest = Math.max(newest, trail.times[trail.times.length - 1]);
    const horizon = newest - TRAIL_MINUTES * 60;
    for (const [id, trail] of trails) {
      let drop = 0;
      while (drop < trail.times.length && trail.times[drop] < horizon) drop++;
      if (drop) {
        trail.times.splice(0, drop);
        trail.points.splice(0, drop);
      }
      if (trail.points.length < 2) {
        if (!trail.points.length) {
          trail.line?.remove();
          trails.delete(id);
        }
        continue;
      }
      if (trail.line) trail.line.setLatLngs(trail.points);
      else trail.line = L.polyline(trail.points, { ...TRAIL_STYLE, renderer }).addTo(trailLayer);
    }
  }

  // --- a vehicle's track for the day -------------------------------------------------------------

  async function vehicleClicked(vehicle) {
    const at = mode === "live" ? Date.now() / 1000 : replayTime();
    const day = new Date(at * 1000);
    day.setHours(0, 0, 0, 0);
    const search = new URLSearchParams({
      format: "geojson",
      from: (day.getTime() / 1000).toFixed(3),
      to: Math.max(at, day.getTime() / 1000 + 1).toFixed(3),
    });
    if (token) search.set("token", token);
    try {
      const geojson = await getJSON(`/vehicles/${encodeURIComponent(vehicle.id)}/track?${search}`);
      trackLayer.clearLayers();
      L.geoJSON(geojson, { style: TRACK_STYLE }).addTo(trackLayer);
      trackLayer.vehicleId = vehicle.id;
      notice(`${vehicle.id}: track since ${clock(day.getTime() / 1000)}`);
    } catch (error) {
      notice(`track of ${vehicle.id}: ${error.message}`);
    }
  }

  function notice(text) {
    $("history-notice").textContent = text;
  }

  return {
    /** Extra feed parameters: from= and speed= while replaying (from where it now is). */
    feedParams() {
      if (!replay) return {};
      // Ended: a view moved afterwards shows the replay's last second (then ends again).
      const from = mode === "ended" ? replay.until - 1 : replayTime();
      Object.assign(replay, { from, startedAt: Date.now() });
      return { from: from.toFixed(3), to: replay.until.toFixed(3), speed: String(replay.speed) };
    },
    /** Follow a feed client: trails grow from it, and its end ends the replay. */
    attach(client) {
      feed = client;
      feed.onUpdate(follow);
      feed.onState((state) => {
        if (state === "ended" && mode === "replay") setMode("ended");
      });
    },
    vehicleClicked,
    startReplay,
    backToLive,
    get mode() {
      return mode;
    },
    get trails() {
      return trails;
    },
    get trackLayer() {
      return trackLayer;
    },
    replayTime,
  };
}

/** The JSON of a GET, or an Error carrying the server's message. */
async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.message ?? `${response.status} ${response.statusText}`);
  return body;
}

/** A Unix time as the local clock shows it (date too when not today). */
function clock(ts) {
  const when = new Date(ts * 1000);
  const today = new Date().toDateString() === when.toDateString();
  return today ? when.toLocaleTimeString() : when.toLocaleString();
}
