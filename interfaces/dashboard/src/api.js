// The API (same origin, /api) and the toolbox (the sandbox's toolboxProxyUrl, another origin: CORS).

const KEY = "tidepool.apiKey";
export const apiBase = `${location.origin}/api`;

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body.message || body.detail || message;
  } catch {
    /* not JSON */
  }
  return new ApiError(response.status, Array.isArray(message) ? JSON.stringify(message) : String(message));
}

/** fetch with the key; JSON in and out (text for text/plain, null for 204). Throws ApiError. */
export async function request(url, { method = "GET", body, key = session.key, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(url, { method, headers, body: payload });
  if (!response.ok) throw await failure(response);
  if (raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export const api = (path, options) => request(`${apiBase}${path}`, options);

/** Every sandbox of the organization, following the cursor 200 at a time; `onPage(soFar)` after each page
 * so the first rows render before the last page arrives. */
export async function listAllSandboxes(onPage = () => {}) {
  const all = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: "200" });
    if (cursor) query.set("cursor", cursor);
    const page = await api(`/sandbox?${query}`);
    all.push(...page.items);
    cursor = page.nextCursor;
    if (cursor) onPage(all);
  } while (cursor);
  return all;
}

export const toolbox = (sandbox, path, options) =>
  request(`${sandbox.toolboxProxyUrl.replace(/\/$/, "")}/${sandbox.id}${path}`, options);

/** The PTY WebSocket: a browser cannot set headers, so the key travels as a subprotocol the proxy strips. */
export function ptySocket(sandbox, id, cols, rows) {
  const base = sandbox.toolboxProxyUrl.replace(/\/$/, "").replace(/^http/, "ws");
  const query = new URLSearchParams({ id, cols: String(cols), rows: String(rows) });
  const url = `${base}/${sandbox.id}/process/pty/create-connect?${query}`;
  const socket = new WebSocket(url, ["X-Daytona-Pty-Exit-Control", `Tidepool-Bearer~${session.key}`]);
  socket.binaryType = "arraybuffer";
  return socket;
}
