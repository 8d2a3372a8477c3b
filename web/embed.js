// The embed page (`/embed`): a tracking link (a token bound to vehicles, see
// docs/security.md) gets the page that follows its vehicle (link.js); any other token or
// area gets the live map (map.js). The token's claims are only read here, never trusted:
// the server checks the token on every request.

const token = new URLSearchParams(location.search).get("token");

/** The claims of a JWT, unverified; null if it is not one. */
export function claimsOf(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

const claims = token ? claimsOf(token) : null;
if (Array.isArray(claims?.vehicles)) await import("./link.js");
else await import("./map.js");
