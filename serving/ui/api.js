// The console's only way to the server: the public HTTP API, with the same bearer token a CLI user sends.
// Paths are relative to the page (/ui), so the console works behind any prefix the API itself is under.

const TOKEN_KEY = "mergeserve-token";

/** A refused request: the server's RFC 9457 problem (status, code, detail), shown to the user as is. */
export class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

// Kept for the tab's life only (sessionStorage): a token left in localStorage would outlive the session.
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

async function problem(r) {
  try {
    const body = await r.json();
    const code = String(body.type || "").split("/").pop() || "http-error";
    return new ApiError(r.status, code, body.detail || r.statusText);
  } catch {
    return new ApiError(r.status, "http-error", r.statusText);
  }
}

/**
 * One API call. `json` is sent as a JSON body, `form` as multipart; `auth` adds the bearer token (when one
 * is set) as mutating routes need. Resolves to the parsed body; rejects with an ApiError.
 */
export async function call(path, { method = "GET", json, form, auth = false } = {}) {
  const headers = {};
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  if (auth && token()) headers.Authorization = `Bearer ${token()}`;
  let r;
  try {
    r = await fetch(path, { method, headers, body });
  } catch (e) {
    throw new ApiError(0, "unreachable", `the server did not answer (${e.message})`);
  }
  if (!r.ok) throw await problem(r);
  return r.json();
}

/** Every job of a task, newest first, following `next_cursor` (at most `pages` pages of 200). */
export async function allJobs(task, pages = 5) {
  const jobs = [];
  let cursor = null;
  for (let i = 0; i < pages; i++) {
    const q = new URLSearchParams({ task, limit: "200" });
    if (cursor) q.set("cursor", cursor);
    const page = await call(`v1/jobs?${q}`);
    jobs.push(...page.jobs);
    cursor = page.next_cursor;
    if (!cursor) break;
  }
  return jobs;
}
