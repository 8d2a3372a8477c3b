// A live feed of vehicles in the browser: one EventSource per feed URL per browser, shared
// by every tab of the origin that watches the same URL. See docs/web-client.md.
//
//   import { FeedClient } from "/web/feed-client.js";
//   const feed = new FeedClient("/feed?bbox=13.3,52.4,13.5,52.6&token=...");
//   feed.onUpdate((changes, table) => draw(table.vehicles));
//   feed.onState((state) => console.log(state, feed.problem)); // connecting | live | reconnecting | offline | ended
//
// A feed whose token expires or is revoked ends (`ended`, with `problem.error`
// "token_expired" or "token_revoked"); it is not reopened.
//
// When the server refuses a feed (EventSource only says "error"), the client asks once
// more with fetch() to learn why: `feed.problem` is then {status, error, message} from the
// JSON error body (401 no or an expired token, 403 outside the token's area, 429 ...).
// Refusals that cannot change by waiting (400, 401, 403, 404) are not retried.
//
// Browsers open at most six HTTP/1.1 connections per host, and an EventSource holds one
// for good: ten tabs of the map would hang. So tabs elect a leader per feed URL with the
// Web Locks API; the leader alone opens the EventSource and relays every event over a
// BroadcastChannel; a tab that joins asks the leader for its table. When the leader tab
// closes, its lock is released, another tab takes over and resumes from the last event id.

import { VehicleTable } from "./wire.js";

const CHANNEL_PREFIX = "tracker-feed ";
const RETRY_MS = 5000;
const FINAL = new Set([400, 401, 403, 404]); // waiting does not change these answers

export class FeedClient {
  #url;
  #share;
  #listeners = { update: new Set(), state: new Set() };
  #state = "connecting";
  #problem = null;
  #lastEventId = null;
  #session = null; // what the current URL holds open: {close()}
  #window = { start: performance.now(), updates: 0, bytes: 0 };

  /** @param {string} url a feed URL (query included); @param {{share?: boolean}} options */
  constructor(url, { share = true } = {}) {
    this.table = new VehicleTable();
    this.stats = { updatesPerSecond: 0, bytesPerSecond: 0, events: 0 };
    this.#share = share && "locks" in navigator && "BroadcastChannel" in self;
    this.#statsTimer = setInterval(() => this.#rollStats(), 1000);
    this.setUrl(url);
  }

  #statsTimer;

  get url() {
    return this.#url;
  }

  /** connecting | live | reconnecting | offline | ended (a replay's `end` event came) */
  get state() {
    return this.#state;
  }

  /** Why the server refused the feed, while offline, or ended it (a token that expired or
   * was revoked): {status, error, message}; else null. */
  get problem() {
    return this.#problem;
  }

  /** Call fn(changes, table) after every applied event; returns an unsubscribe function. */
  onUpdate(fn) {
    this.#listeners.update.add(fn);
    return () => this.#listeners.update.delete(fn);
  }

  /** Call fn(state) on every change of connection state; returns an unsubscribe function. */
  onState(fn) {
    this.#listeners.state.add(fn);
    return () => this.#listeners.state.delete(fn);
  }

  /**
   * Watch another feed URL. The table is kept until the new feed's snapshot replaces it,
   * so markers do not flicker while the view moves.
   */
  setUrl(url) {
    const absolute = new URL(url, location.href).href;
    if (absolute === this.#url) return;
    this.#session?.close();
    this.#url = absolute;
    this.#lastEventId = null;
    this.#setState("connecting");
    this.#session = this.#share ? this.#shared(absolute) : this.#own(absolute, () => {});
  }

  /** Stop for good. */
  close() {
    this.#session?.close();
    this.#session = null;
    clearInterval(this.#statsTimer);
    this.#setState("offline");
  }

  // --- one EventSource of our own ------------------------------------------------------

  #own(url, relay) {
    let source = null;
    let retry = null;
    let closed = false;
    const onEvent = (message) => {
      const event = { event: message.type, data: message.data, id: message.lastEventId };
      this.#apply(event);
      relay({ type: "event", ...event });
    };
    const open = () => {
      source = new EventSource(this.#resumeUrl(url));
      // message: a vehicle feed's compact events (no event: line), docs/wire-format.md
      for (const name of ["snapshot", "batch", "message"]) source.addEventListener(name, onEvent);
      source.addEventListener("shutdown", () => this.#changeState("reconnecting", relay));
      source.addEventListener("end", () => {
        closed = true; // a replay is over: do not let EventSource reconnect
        source.close();
        this.#changeState("ended", relay);
      });
      for (const [name, error] of [["expired", "token_expired"], ["revoked", "token_revoked"]]) {
        source.addEventListener(name, (message) => {
          closed = true; // the token is over: reconnecting would only be refused
          source.close();
          this.#changeState("ended", relay, { status: 401, error, message: message.data });
        });
      }
      source.onopen = () => this.#changeState("live", relay);
      source.onerror = async () => {
        if (source.readyState !== EventSource.CLOSED) {
          this.#changeState("reconnecting", relay); // EventSource retries by itself
          return;
        }
        // Refused with an HTTP error: EventSource gives up, without saying why. Ask, then
        // try again later (resuming) unless the answer cannot change by waiting.
        const problem = await refusal(this.#resumeUrl(url));
        if (closed) return;
        this.#changeState("offline", relay, problem);
        if (!FINAL.has(problem?.status)) retry = setTimeout(() => closed || open(), RETRY_MS);
      };
    };
    open();
    return {
      close: () => {
        closed = true;
        clearTimeout(retry);
        source.close();
      },
    };
  }

  #resumeUrl(url) {
    if (!this.#lastEventId) return url;
    const resumed = new URL(url);
    resumed.searchParams.set("last_event_id", this.#lastEventId);
    return resumed.href;
  }

  #changeState(state, relay, problem = null) {
    this.#setState(state, problem);
    relay({ type: "state", state, problem });
  }

  // --- one EventSource per browser, shared by tabs ---------------------------------------

  #shared(url) {
    const channel = new BroadcastChannel(CHANNEL_PREFIX + url);
    let leading = null; // our own EventSource, once we lead
    let release; // resolves the lock's promise: lets another tab lead
    const held = new Promise((resolve) => (release = resolve));
    const relay = (message) => channel.postMessage(message);
    channel.onmessage = ({ data: message }) => {
      if (leading) {
        if (message.type === "hello") relay(this.#tableMessage());
        return;
      }
      if (message.type === "event") this.#apply(message);
      else if (message.type === "state") this.#setState(message.state, message.problem);
      else if (message.type === "table") this.#adopt(message);
    };
    navigator.locks
      .request(CHANNEL_PREFIX + url, () => {
        if (this.#url !== url) return undefined; // switched away while waiting
        leading = this.#own(url, relay);
        return held;
      })
      .catch(() => {});
    relay({ type: "hello" }); // a leader, if there is one, sends its table
    return {
      close: () => {
        leading?.close();
        release();
        channel.close();
      },
    };
  }

  #tableMessage() {
    const { table, state } = { table: this.table.toJSON(), state: this.#state };
    return { type: "table", table, id: this.#lastEventId, state, problem: this.#problem };
  }

  #adopt({ table, id, state, problem }) {
    const before = new Set(this.table.vehicles.keys());
    this.table = VehicleTable.fromJSON(table);
    this.#lastEventId = id;
    const changed = new Set(this.table.vehicles.keys());
    const removed = new Set([...before].filter((vid) => !changed.has(vid)));
    this.#setState(state, problem);
    this.#emit({ snapshot: true, changed, removed });
  }

  // --- applying events -------------------------------------------------------------------

  #apply({ event, data, id }) {
    if (id) this.#lastEventId = id;
    const changes = this.table.applyEvent(event, data);
    this.stats.events += 1;
    this.#window.updates += changes.changed.size;
    this.#window.bytes += data.length;
    if (this.#state !== "live") this.#setState("live");
    this.#emit(changes);
  }

  #emit(changes) {
    for (const fn of this.#listeners.update) fn(changes, this.table);
  }

  #setState(state, problem = null) {
    const same = problem?.status === this.#problem?.status && problem?.message === this.#problem?.message;
    if (state === this.#state && same) return;
    this.#state = state;
    this.#problem = state === "offline" || state === "ended" ? problem : null;
    for (const fn of this.#listeners.state) fn(state, this.#problem);
  }

  #rollStats() {
    const now = performance.now();
    const seconds = (now - this.#window.start) / 1000;
    this.stats.updatesPerSecond = this.#window.updates / seconds;
    this.stats.bytesPerSecond = this.#window.bytes / seconds;
    this.#window = { start: now, updates: 0, bytes: 0 };
  }
}

/**
 * Why the server refuses `url`: {status, error, message} from its JSON error body, or null
 * if it answers 200 now (the request is dropped at once) or cannot be reached.
 */
async function refusal(url) {
  const controller = new AbortController();
  try {
    const response = await fetch(url, { signal: controller.signal, cache: "no-store" });
    if (response.ok) return null;
    const body = await response.json().catch(() => ({}));
    return { status: response.status, error: body.error ?? "", message: body.message ?? "" };
  } catch {
    return null;
  } finally {
    controller.abort();
  }
}
