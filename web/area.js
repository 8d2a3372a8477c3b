// Map areas as feed queries: a viewport to `bbox=`, a query back to map bounds, and
// whether an area is small enough for one feed. Pure functions; the map page uses them.

import { cellToBoundary, getHexagonAreaAvg, gridDisk, polygonToCells } from "./vendor/h3-js/h3-js.es.js";

const DIGITS = 5; // 1e-5 degree, about a metre: the wire's own precision

/** The feed query of a Leaflet LatLngBounds, clamped to the served band. */
export function bboxQuery(bounds) {
  const west = Math.max(-180, bounds.getWest());
  const east = Math.min(180, bounds.getEast());
  const south = Math.max(-85, bounds.getSouth());
  const north = Math.min(85, bounds.getNorth());
  return { bbox: [west, south, east, north].map((v) => v.toFixed(DIGITS)).join(",") };
}

/** The area named by a page's query (`bbox=` or `cells=`), or null. */
export function areaFromQuery(params) {
  if (params.get("bbox")) return { bbox: params.get("bbox") };
  if (params.get("cells")) return { cells: params.get("cells") };
  return null;
}

/** [[south, west], [north, east]] of an area query, for fitBounds. */
export function boundsOf(area) {
  if (area.bbox) {
    const [west, south, east, north] = area.bbox.split(",").map(Number);
    return [[south, west], [north, east]];
  }
  const points = area.cells.split(",").flatMap((cell) => cellToBoundary(cell.trim()));
  const lats = points.map((p) => p[0]);
  const lons = points.map((p) => p[1]);
  return [[Math.min(...lats), Math.min(...lons)], [Math.max(...lats), Math.max(...lons)]];
}

/** About how many index cells a bbox query covers (the server refuses too many). */
export function estimatedCells(area, resolution) {
  if (!area.bbox) return area.cells.split(",").length;
  const [west, south, east, north] = area.bbox.split(",").map(Number);
  const midLat = ((south + north) / 2) * (Math.PI / 180);
  const km2 = (north - south) * 111.32 * (east - west) * 111.32 * Math.cos(midLat);
  return km2 / getHexagonAreaAvg(resolution, "km2") + 4 * Math.sqrt(km2 / getHexagonAreaAvg(resolution, "km2"));
}

/** The index cells of an area (a bbox padded by one ring, as the server covers it). */
export function cellsOf(area, resolution) {
  if (area.cells) return area.cells.split(",").map((c) => c.trim());
  const [west, south, east, north] = area.bbox.split(",").map(Number);
  const ring = [[south, west], [south, east], [north, east], [north, west]];
  return [...new Set(polygonToCells(ring, resolution).flatMap((cell) => gridDisk(cell, 1)))];
}

export { cellToBoundary };
