// Zones on the map: every zone drawn with its name, and an editor to draw, name and delete
// polygons and circles (docs/zones.md). The map (map.js) installs it once; it reads and
// writes /zones itself. Drawing is Leaflet-Geoman's (web/vendor/leaflet-geoman/); writing
// needs an admin token in the page's URL (?token=...), reading any token that may read.

const PAGE = 1000; // zones per GET /zones page (the API's largest)
const MAX_PAGES = 100; // at most this many pages are read (100,000 zones: the API's limit)
const STYLE = { color: "#7c3aed", weight: 2, opacity: 0.9, fillOpacity: 0.08 };
const KINDS = ["depot", "customer", "restricted", "zone"];

/**
 * Draw the zones on `map` (a Leaflet map) and add the editor.
 *
 * @param {{map: any, token: string | null}} options
 * @returns {{layer: any, zones: Map<string, object>, reload: () => Promise<void>}}
 */
export function installZones({ map, token }) {
  const L = window.L;
  const layer = L.featureGroup().addTo(map);
  const zones = new Map(); // zone id -> {feature, shape}
  const headers = token ? { Authorization: `Bearer ${token}` } : {};

  // --- reading and drawing ------------------------------------------------------------------

  async function reload() {
    const features = [];
    let after = "";
    for (let page = 0; page < MAX_PAGES; page += 1) {
      const query = new URLSearchParams({ limit: String(PAGE), after });
      const response = await fetch(`/zones?${query}`, { headers });
      if (!response.ok) {
        notice(response.status === 401 ? "" : `zones: ${await problemOf(response)}`);
        return;
      }
      const collection = await response.json();
      features.push(...collection.features);
      if (!collection.next) break;
      after = collection.next;
    }
    layer.clearLayers();
    zones.clear();
    for (const feature of features) draw(feature);
  }

  function draw(feature) {
    const old = zones.get(feature.id);
    if (old) layer.removeLayer(old.shape);
    const shape = shapeOf(feature);
    shape.zoneId = feature.id;
    shape.bindTooltip(labelOf(feature), {
      permanent: true,
      direction: "center",
      className: "zone-label",
    });
    shape.bindPopup(() => popupOf(feature));
    shape.addTo(layer);
    zones.set(feature.id, { feature, shape });
  }

  function shapeOf(feature) {
    const g = feature.geometry;
    if (g.type === "Point") {
      return L.circle([g.coordinates[1], g.coordinates[0]], {
        ...STYLE,
        radius: feature.properties.radius_m,
        pmIgnore: true,
      });
    }
    return L.geoJSON(feature, { style: () => STYLE, pmIgnore: true });
  }

  function labelOf(feature) {
    const p = feature.properties;
    return escape(p.name || feature.id);
  }

  function popupOf(feature) {
    const p = feature.properties;
    const box = L.DomUtil.create("div", "zone-popup");
    box.innerHTML = `<b>${escape(p.name || feature.id)}</b><br>${escape(p.kind)} · ${escape(
      feature.id,
    )}${p.dwell_s != null ? `<br>dwell ${p.dwell_s} s` : ""}<br>`;
    const remove = L.DomUtil.create("button", "zone-delete", box);
    remove.type = "button";
    remove.textContent = "delete zone";
    remove.addEventListener("click", () => removeZone(feature.id));
    return box;
  }

  // --- the editor ---------------------------------------------------------------------------

  const form = L.DomUtil.create("form", "zone-form leaflet-bar");
  form.id = "zone-form";
  form.hidden = true;
  form.innerHTML = `
    <input id="zone-name" required maxlength="200" placeholder="zone name" aria-label="zone name">
    <select id="zone-kind" aria-label="zone kind">${KINDS.map((k) => `<option>${k}</option>`).join("")}</select>
    <button type="submit" id="zone-save">save zone</button>
    <button type="button" id="zone-cancel">cancel</button>
    <div id="zone-notice" role="status"></div>`;
  L.DomEvent.disableClickPropagation(form);
  const control = L.control({ position: "topleft" });
  control.onAdd = () => form;
  control.addTo(map);
  const nameInput = form.querySelector("#zone-name");
  const kindInput = form.querySelector("#zone-kind");
  let drawn = null; // the shape waiting for a name

  if (map.pm) {
    map.pm.addControls({
      position: "topleft",
      drawMarker: false,
      drawCircleMarker: false,
      drawPolyline: false,
      drawText: false,
      editMode: false,
      dragMode: false,
      cutPolygon: false,
      rotateMode: false,
      removalMode: false,
    });
    map.on("pm:create", (event) => {
      if (drawn) drawn.remove();
      drawn = event.layer;
      form.hidden = false;
      nameInput.focus();
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!drawn) return;
    const feature = featureOf(drawn, nameInput.value.trim(), kindInput.value);
    const response = await fetch("/zones", {
      method: "POST",
      headers: { ...headers, "Content-Type": "application/geo+json" },
      body: JSON.stringify(feature),
    });
    if (!response.ok) {
      notice(await problemOf(response));
      return;
    }
    draw(await response.json());
    drawn.remove();
    drawn = null;
    form.hidden = true;
    nameInput.value = "";
    notice("");
  });
  form.querySelector("#zone-cancel").addEventListener("click", () => {
    if (drawn) drawn.remove();
    drawn = null;
    form.hidden = true;
  });

  function featureOf(shape, name, kind) {
    const properties = { name, kind };
    if (shape instanceof L.Circle) {
      const c = shape.getLatLng();
      properties.radius_m = shape.getRadius();
      return { type: "Feature", geometry: { type: "Point", coordinates: [c.lng, c.lat] }, properties };
    }
    return { type: "Feature", geometry: shape.toGeoJSON().geometry, properties };
  }

  async function removeZone(id) {
    const response = await fetch(`/zones/${encodeURIComponent(id)}`, { method: "DELETE", headers });
    if (!response.ok && response.status !== 404) {
      notice(await problemOf(response));
      return;
    }
    const known = zones.get(id);
    if (known) layer.removeLayer(known.shape);
    zones.delete(id);
    map.closePopup();
  }

  function notice(text) {
    form.querySelector("#zone-notice").textContent = text;
    if (text) form.hidden = false;
  }

  reload();
  return { layer, zones, reload, removeZone };
}

async function problemOf(response) {
  try {
    const body = await response.json();
    if (body.error === "admin_required" || response.status === 401) {
      return "changing zones needs an admin token (open the map with ?token=<admin token>)";
    }
    return body.message || body.error || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function escape(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
