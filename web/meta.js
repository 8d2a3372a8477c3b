// Vehicle metadata (name, kind, plate, properties) for the map's popup and list: asked for
// once per session per vehicle, in batches of at most 100 (`GET /meta?vehicles=`), and
// cached; never part of the feed's batches. See docs/wire-format.md.

const BATCH = 100;
const DELAY_MS = 250; // gather the vehicles a list or a click asks for into one request

export class VehicleMeta {
  #known = new Map(); // id -> metadata, or null: asked, none
  #wanted = new Set();
  #timer = null;
  #token;

  /** @param {string|null} token the page's token, if any; @param {() => void} onChange */
  constructor(token, onChange = () => {}) {
    this.#token = token;
    this.onChange = onChange;
  }

  /** What is known of `id` now (null: nothing yet); asks the server once if never asked. */
  get(id) {
    if (id.includes(",")) return null; // cannot be asked for in a list
    if (!this.#known.has(id) && !this.#wanted.has(id)) {
      this.#wanted.add(id);
      this.#timer ??= setTimeout(() => this.#ask(), DELAY_MS);
    }
    return this.#known.get(id) ?? null;
  }

  /** The name to show for `id`: "Name (id)" when it has one. */
  label(id) {
    const name = this.get(id)?.name;
    return name ? `${name} (${id})` : id;
  }

  async #ask() {
    this.#timer = null;
    const ids = [...this.#wanted].slice(0, BATCH);
    for (const id of ids) this.#wanted.delete(id);
    if (this.#wanted.size) this.#timer = setTimeout(() => this.#ask(), DELAY_MS);
    const query = new URLSearchParams({ vehicles: ids.join(",") });
    if (this.#token) query.set("token", this.#token);
    let found = {};
    try {
      const response = await fetch(`/meta?${query}`, { cache: "no-store" });
      if (response.ok) found = await response.json();
    } catch {
      // metadata is a nicety: ids are shown without it
    }
    for (const id of ids) this.#known.set(id, found[id] ?? null);
    if (Object.keys(found).length) this.onChange();
  }
}
