// The API as the console uses it: same origin, the key as a Bearer token, OpenAI's error envelope
// turned into an Error with the server's message. The key lives in this tab's sessionStorage only.
import { EventSourceParserStream } from "eventsource-parser/stream";

const KEY = "rlhf.apiKey";
let onSignedOut = () => {};

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (k) => sessionStorage.setItem(KEY, k),
  clear: () => sessionStorage.removeItem(KEY),
};

/** Called with a message when the server stops accepting the key (revoked or expired mid-session). */
export function whenSignedOut(fn) {
  onSignedOut = fn;
}

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function failure(res) {
  let message = `${res.status} ${res.statusText}`;
  let param = null;
  try {
    const body = await res.json();
    message = body?.error?.message || message;
    param = body?.error?.param || null;
  } catch {
    /* not JSON: keep the status line */
  }
  if (res.status === 401 && key.get()) {
    key.clear();
    onSignedOut(`Signed out: the server no longer accepts your key (${message}). Sign in with a valid key.`);
  }
  return new ApiError(res.status, message, param);
}

function headers(extra = {}, k = key.get()) {
  return { ...(k ? { Authorization: `Bearer ${k}` } : {}), ...extra };
}

/** JSON in, JSON out. `body` is sent as JSON, `form` as multipart (file uploads). */
export async function api(path, { method = "GET", body, form, params, signal, apiKey } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) if (v !== undefined && v !== null) url.searchParams.set(k, v);
  const init = { method, signal, headers: headers(body ? { "Content-Type": "application/json" } : {}, apiKey) };
  if (body) init.body = JSON.stringify(body);
  if (form) init.body = form;
  const res = await fetch(url, init);
  if (!res.ok) throw await failure(res);
  return res.json();
}

/** Every item of a list route, following `after` = the previous page's `last_id` (at most `max`). */
export async function all(path, { params = {}, max = 2000, pageSize = 100 } = {}) {
  const out = [];
  let after;
  for (;;) {
    const page = await api(path, { params: { ...params, limit: pageSize, after } });
    out.push(...page.data);
    if (!page.has_more || out.length >= max || !page.data.length) return out;
    after = page.last_id;
  }
}

/** Server-sent events over fetch (EventSource cannot send a key): calls onEvent({event, data}) for each,
 * resolves when the stream ends. Aborted through `signal`. */
export async function stream(path, { method = "GET", body, params, signal, onEvent }) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
  const init = { method, signal, headers: headers({ Accept: "text/event-stream" }) };
  if (body) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(url, init);
  if (!res.ok) throw await failure(res);
  const events = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
  const reader = events.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (value.data === "[DONE]") return;
    onEvent(value);
  }
}
