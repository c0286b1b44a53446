// The HTTP side of the playground: the API key, requests, the error envelope, waiting for jobs.

const KEY_STORAGE = "attnseg.apiKey";
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const WAIT_S = 30; // long-poll hold per request; `progress=true`: any progress report ends it early too
const RETRIES = 5; // 429/503 and dropped connections while waiting, each after Retry-After

// The page lives at <api>/ui/: the API is its parent, so a path prefix in front of both keeps working.
const API_ROOT = new URL("../", window.location.href);

export function getApiKey() {
  return window.sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) window.sessionStorage.setItem(KEY_STORAGE, key);
  else window.sessionStorage.removeItem(KEY_STORAGE);
}

/** An API error: the envelope's code, message and field, with the HTTP status (0: no answer). */
export class ApiError extends Error {
  constructor(status, code, message, { field = null, retryAfter = null, body = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.field = field;
    this.retryAfter = retryAfter;
    this.body = body;
  }
}

/**
 * path ("segment/text", no leading slash) -> parsed JSON; throws ApiError on anything but 2xx.
 * body: FormData (multipart) or, as `json`, an object sent as application/json.
 */
export async function request(path, { method = "GET", body, json, signal } = {}) {
  const headers = { Accept: "application/json" };
  const key = getApiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(new URL(path, API_ROOT), { method, body, headers, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", "The API did not answer. Is the service running? " +
      "(check the address and your connection)");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // a proxy's HTML error page, for instance
  }
  if (!response.ok) {
    const envelope = data && data.error;
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    throw new ApiError(response.status, envelope?.code || `http_${response.status}`,
      envelope?.message || `The API answered ${response.status} ${response.statusText}`.trim(),
      { field: envelope?.field ?? null, retryAfter, body: data });
  }
  return data;
}

function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, seconds * 1000);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

const TRANSIENT = new Set([0, 429, 502, 503, 504]);

/**
 * Long-polls GET /jobs/{id}?wait=N&progress=true until the job ends; onUpdate(job) after every answer
 * (each progress report or status change answers at once).
 * Busy (429/503) and dropped answers are retried after Retry-After, a few times in a row.
 */
export async function waitForJob(id, onUpdate, signal) {
  let failures = 0;
  for (;;) {
    let job;
    try {
      job = await request(`jobs/${encodeURIComponent(id)}?wait=${WAIT_S}&progress=true`, { signal });
      failures = 0;
    } catch (error) {
      if (!(error instanceof ApiError) || !TRANSIENT.has(error.status) || ++failures > RETRIES) throw error;
      await sleep(error.retryAfter || 2, signal);
      continue;
    }
    onUpdate(job);
    if (FINAL.has(job.status)) return job;
  }
}

/** Asks the API to cancel a job (queued: at once; running: at the worker's next step). */
export function cancelJob(id) {
  return request(`jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
}

/** Builds multipart form data: files as [name, File] pairs, lists as one JSON array field. */
export function formData(files, fields) {
  const form = new FormData();
  for (const [name, file] of files) form.append(name, file, file.name);
  for (const [name, value] of Object.entries(fields)) {
    if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) continue;
    form.append(name, Array.isArray(value) ? JSON.stringify(value) : String(value));
  }
  return form;
}

/** A File -> a data URL, which the API's `*_base64` fields accept. */
export function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}
