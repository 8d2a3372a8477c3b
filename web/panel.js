// The map page's side panel: the vehicles in view (id, speed, last seen, stale ones
// marked), a search that asks the server where a vehicle is (`GET /vehicles/{id}`), and
// which vehicle is followed. Also the words for a refused feed, which both pages show.

const MAX_ROWS = 200; // a longer list helps no one and costs a frame to build

/**
 * What to tell a person whose feed (or search) the server refused: {title, todo}.
 * `problem` is {status, error, message} from the JSON error body.
 */
export function explainRefusal(problem, { token, embed }) {
  const ask = embed ? "ask whoever gave you this page" : "ask your tracker's operator";
  if (problem.status === 401 && !token) {
    return {
      title: "This map needs a feed token",
      todo: embed
        ? `This page was opened without its token: ${ask} for the full link.`
        : "Open the link that “tracker serve” printed (/?token=…), or mint a token with " +
          "“tracker token” and add ?token=… to the address.",
    };
  }
  if (problem.status === 401 && /expired/i.test(problem.message)) {
    return { title: "This tracking link has expired", todo: `Links are valid for a limited time: ${ask} for a new one.` };
  }
  if (problem.status === 401) {
    return { title: "This link's token is not valid here", todo: `Check that the link is complete, or ${ask} for a new one.` };
  }
  if (problem.status === 403) {
    return {
      title: "Not allowed to view this area",
      todo: embed
        ? `The link's token covers another area: ${ask} for a link to this one.`
        : "The token covers a smaller area: zoom in or pan back to it, or ask for a token for this area.",
    };
  }
  if (problem.status === 429) {
    return { title: "Too many maps open", todo: "Close some tabs or windows of this map; it reconnects by itself." };
  }
  return { title: `The server refused the feed (${problem.status})`, todo: problem.message };
}

/**
 * The panel of the map page (index.html's #panel). `inView()` lists the vehicles in view;
 * `follow(id, where)` and `unfollow()` drive the map; `meta` names the vehicles (meta.js);
 * `onProblem` shows a refusal.
 */
export function createPanel({ token, inView, follow, unfollow, meta, onProblem }) {
  const panel = document.getElementById("panel");
  const toggle = document.getElementById("panel-toggle");
  const body = document.querySelector("#vehicle-list tbody");
  const summary = document.getElementById("list-summary");
  const result = document.getElementById("search-result");
  const followingBox = document.getElementById("following");

  // Open by default where there is room for it; a phone opens it on demand.
  setOpen(!matchMedia("(max-width: 640px)").matches);
  toggle.addEventListener("click", () => setOpen(panel.dataset.open !== "true"));
  function setOpen(open) {
    panel.dataset.open = String(open);
    toggle.setAttribute("aria-expanded", String(open));
  }

  document.getElementById("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("search-id").value.trim();
    if (id) find(id);
  });
  document.getElementById("unfollow").addEventListener("click", () => unfollow());
  body.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-id]");
    const v = row && inView().find((candidate) => candidate.id === row.dataset.id);
    if (v) follow(v.id, v);
  });

  /** Ask the server where vehicle `id` is (anywhere, not only in view); follow it there. */
  async function find(id) {
    result.textContent = `looking for ${id}…`;
    const query = token ? `?${new URLSearchParams({ token })}` : "";
    let response;
    try {
      response = await fetch(`/vehicles/${encodeURIComponent(id)}${query}`, { cache: "no-store" });
    } catch {
      result.textContent = "the tracker cannot be reached";
      return;
    }
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      result.textContent = "";
      follow(answer.id, answer);
    } else if (response.status === 404) {
      result.textContent = `no vehicle “${id}” is tracked (never heard from, or silent too long)`;
    } else if (response.status === 403) {
      result.textContent = `“${id}” is outside the area this map's token may view`;
    } else {
      result.textContent = answer.message ?? `refused (${response.status})`;
      if (response.status === 401) onProblem({ status: 401, ...answer });
    }
  }

  function showFollowing(id) {
    followingBox.hidden = !id;
    followingBox.querySelector("b").textContent = id ?? "";
  }

  /** Rebuild the list (once a second): the first MAX_ROWS in view, by id. */
  function refresh() {
    if (panel.dataset.open !== "true") return;
    const vehicles = inView().sort((a, b) => a.id.localeCompare(b.id, "en", { numeric: true }));
    const shown = vehicles.slice(0, MAX_ROWS);
    const count = vehicles.length.toLocaleString("en");
    summary.textContent =
      vehicles.length > MAX_ROWS ? `${count} vehicles in view, the first ${MAX_ROWS} listed` : `${count} vehicles in view`;
    const now = Date.now() / 1000;
    const rows = shown.map((v) => {
      const row = document.createElement("tr");
      row.dataset.id = v.id;
      row.title = `follow ${v.id}`;
      if (v.stale) row.className = "stale";
      const speed = v.speed === null ? "–" : (v.speed * 3.6).toFixed(0);
      const seen = `${Math.max(0, now - v.ts).toFixed(0)} s${v.stale ? " · stale" : ""}`;
      for (const text of [meta?.label(v.id) ?? v.id, speed, seen]) row.insertCell().textContent = text;
      return row;
    });
    body.replaceChildren(...rows);
  }

  return { find, refresh, showFollowing };
}
