// The feed wire format in the browser: cell frames decoded, and the vehicle table they
// describe. The one place in web/ that knows the byte layout; it mirrors tracker/wire.py
// (FeedView), and docs/wire-format.md is the specification both follow.

import { Decoder } from "./vendor/msgpack/index.mjs";

const SCALE = 100_000; // fixed point: 1e-5 degree
const UNKNOWN = 255; // speed or heading byte meaning "not reported"
const RECORD = 12; // bytes of a full position record
const MOVE = 8; // bytes of a move record
const USUAL_DT = 10; // the time step a compact step leaves out: 1 s, in 0.1 s

// Cells and times are 64-bit: BigInt keeps cell ids exact.
const decoder = new Decoder({ useBigInt64: true });

/** Bytes of a base64 string (a `data:` line of a feed event). */
export function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** One cell frame from its base64 `data:` line. */
export function decodeFrame(line) {
  const [cell, tMs, lat0, lon0, positions, names, gone, stale, removed, moves] = decoder.decode(
    base64Bytes(line),
  );
  return {
    cell: BigInt.asUintN(64, BigInt(cell)).toString(16),
    tMs: Number(tMs),
    lat0: Number(lat0),
    lon0: Number(lon0),
    positions,
    names,
    gone: vids(gone),
    stale: vids(stale),
    removed: vids(removed),
    moves: moves ?? new Uint8Array(0), // frames from before moves existed have 9 fields
  };
}

function vids(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Array(bytes.byteLength / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getUint32(i * 4, true);
  return out;
}

function wrapLon(units) {
  const lon = units / SCALE;
  return lon > 180 ? lon - 360 : lon <= -180 ? lon + 360 : lon;
}

function speedOf(byte) {
  return byte === UNKNOWN ? null : byte * 0.5;
}

function headingOf(byte) {
  return byte === UNKNOWN ? null : byte * 2;
}

/**
 * The vehicles a feed's events describe, keyed by vehicle number (vid).
 *
 * Each vehicle: {vid, id, cell, lat, lon, latQ, lonQ, ts, speed, heading, stale}; latQ/lonQ
 * are the fixed-point position that move records step from.
 */
export class VehicleTable {
  constructor() {
    this.names = new Map();
    this.vehicles = new Map();
  }

  /**
   * Apply one SSE event (`snapshot` replaces the table, `batch` updates it, `message` is a
   * vehicle feed's compact event); others are ignored.
   * Returns {snapshot, changed: Set<vid>, removed: Set<vid>}.
   */
  applyEvent(event, data) {
    const changes = { snapshot: event === "snapshot", changed: new Set(), removed: new Set() };
    if (event === "message") {
      for (const line of data.split("\n")) this.#applyCompact(line, changes);
      for (const vid of changes.changed) changes.removed.delete(vid);
      return changes;
    }
    if (event !== "snapshot" && event !== "batch") return changes;
    if (changes.snapshot) {
      for (const vid of this.vehicles.keys()) changes.removed.add(vid);
      this.vehicles.clear();
    }
    for (const line of data.split("\n")) {
      if (line) this.applyFrame(decodeFrame(line), changes);
    }
    for (const vid of changes.changed) changes.removed.delete(vid);
    return changes;
  }

  /** Apply one cell frame in the order docs/wire-format.md prescribes. */
  applyFrame(frame, changes) {
    for (const [vid, id] of frame.names) this.names.set(Number(vid), id);
    const p = new DataView(frame.positions.buffer, frame.positions.byteOffset, frame.positions.byteLength);
    for (let o = 0; o + RECORD <= p.byteLength; o += RECORD) {
      const vid = p.getUint32(o, true);
      const latQ = frame.lat0 + p.getInt16(o + 4, true);
      const lonQ = frame.lon0 + p.getInt16(o + 6, true);
      this.#put(vid, frame, latQ, lonQ, p.getUint16(o + 8, true), p.getUint8(o + 10), p.getUint8(o + 11));
      changes.changed.add(vid);
    }
    const m = new DataView(frame.moves.buffer, frame.moves.byteOffset, frame.moves.byteLength);
    for (let o = 0; o + MOVE <= m.byteLength; o += MOVE) {
      const vid = m.getUint16(o, true) + m.getUint8(o + 2) * 65536;
      const seen = this.vehicles.get(vid);
      if (!seen) continue; // cannot happen in a stream applied in order
      const latQ = seen.latQ + m.getInt8(o + 3);
      const lonQ = seen.lonQ + m.getInt8(o + 4);
      this.#put(vid, frame, latQ, lonQ, m.getUint8(o + 5), m.getUint8(o + 6), m.getUint8(o + 7));
      changes.changed.add(vid);
    }
    for (const vid of frame.stale) {
      const seen = this.vehicles.get(vid);
      if (seen) {
        seen.stale = true;
        changes.changed.add(vid);
      }
    }
    for (const vid of frame.removed) this.#drop(vid, changes);
    for (const vid of frame.gone) {
      if (this.vehicles.get(vid)?.cell === frame.cell) this.#drop(vid, changes);
    }
  }

  // One line of a compact event (docs/wire-format.md, "Compact vehicle events").
  #applyCompact(line, changes) {
    if (line === "*") {
      changes.snapshot = true;
      for (const vid of this.vehicles.keys()) changes.removed.add(vid);
      this.vehicles.clear();
      return;
    }
    if (line[0] === "=") {
      const fields = line.slice(1).split(",");
      const [vid, latQ, lonQ, tsQ, speed, heading] = fields.slice(0, 6).map(Number);
      this.names.set(vid, JSON.parse(fields.slice(6).join(",")));
      this.#lastVid = vid;
      this.#putFixed(vid, { latQ, lonQ, tsQ, speedQ: speed, headingQ: heading });
      changes.changed.add(vid);
      return;
    }
    const colon = line.lastIndexOf(":");
    const vid = colon >= 0 ? Number(line.slice(0, colon)) : this.#lastVid;
    const body = line.slice(colon + 1);
    const seen = this.vehicles.get(vid);
    if (body === "-") {
      this.#drop(vid, changes);
    } else if (!seen) {
      // cannot happen in a stream applied in order
    } else if (body === "!") {
      seen.stale = true;
      changes.changed.add(vid);
    } else if (body[0] >= "?" && body[0] <= "~") {
      const [dlat = 0, dlon = 0, dt = 0, dspeed = 0, dheading = 0] = stepInts(body);
      this.#putFixed(vid, {
        latQ: seen.latQ + dlat,
        lonQ: wrapStep(seen.lonQ + dlon),
        tsQ: seen.tsQ + USUAL_DT + dt,
        speedQ: seen.speedQ + dspeed,
        headingQ: seen.headingQ + dheading,
      });
      changes.changed.add(vid);
    }
  }

  #lastVid = null; // what an untagged compact line applies to

  #putFixed(vid, q) {
    this.vehicles.set(vid, {
      vid,
      id: this.names.get(vid) ?? String(vid),
      cell: null,
      ...q,
      lat: q.latQ / SCALE,
      lon: wrapLon(q.lonQ),
      ts: q.tsQ / 10,
      speed: speedOf(q.speedQ),
      heading: headingOf(q.headingQ),
      stale: false,
    });
  }

  #put(vid, frame, latQ, lonQ, age, speed, heading) {
    this.vehicles.set(vid, {
      vid,
      id: this.names.get(vid) ?? String(vid),
      cell: frame.cell,
      latQ,
      lonQ: wrapUnits(lonQ),
      lat: latQ / SCALE,
      lon: wrapLon(lonQ),
      ts: frame.tMs / 1000 - age / 10,
      speed: speedOf(speed),
      heading: headingOf(heading),
      stale: false,
    });
  }

  #drop(vid, changes) {
    if (this.vehicles.delete(vid)) {
      changes.removed.add(vid);
      changes.changed.delete(vid);
    }
  }

  /** A structured-cloneable copy (for another tab), and its inverse. */
  toJSON() {
    return { names: [...this.names], vehicles: [...this.vehicles.values()], lastVid: this.#lastVid };
  }

  static fromJSON(state) {
    const table = new VehicleTable();
    table.names = new Map(state.names);
    table.#lastVid = state.lastVid ?? null;
    for (const v of state.vehicles) table.vehicles.set(v.vid, v);
    return table;
  }
}

/** The signed integers of a compact step: zigzag, 5 bits a character from "?" (63), the
 * 0x20 bit meaning "more" (Google's encoded-polyline digits). */
export function stepInts(text) {
  const out = [];
  let value = 0;
  let shift = 0;
  for (let i = 0; i < text.length; i++) {
    const digit = text.charCodeAt(i) - 63;
    value += (digit & 0x1f) * 2 ** shift; // not <<: steps may pass 31 bits
    shift += 5;
    if (digit < 0x20) {
      out.push(value % 2 ? -(value + 1) / 2 : value / 2);
      value = 0;
      shift = 0;
    }
  }
  return out;
}

/** Longitude units into [-180, 180) degrees, as compact steps wrap them. */
function wrapStep(units) {
  const full = 360 * SCALE;
  return ((((units + full / 2) % full) + full) % full) - full / 2;
}

function wrapUnits(units) {
  const full = 360 * SCALE;
  return units > full / 2 ? units - full : units <= -full / 2 ? units + full : units;
}
