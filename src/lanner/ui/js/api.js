// Lanner's HTTP API from the page: JSON calls, server-sent events, uploads.
// With --api-key the first 401 asks for the key once; it is kept in
// sessionStorage (this tab only) and sent as a Bearer token from then on.

const KEY = "lanner-api-key";
let asking = null;

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** The error message of a failed response (OpenAI's error JSON), as text. */
export async function errorText(response) {
  try {
    const body = await response.json();
    return body?.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function askKey(failed) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-error").textContent = failed ? "That key was refused." : "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      sessionStorage.setItem(KEY, input.value.trim());
      input.value = "";
      asking = null;
      resolve();
    }, { once: true });
  });
  dialog.showModal();
  input.focus();
  return asking;
}

/** fetch with the key; a 401 asks for it (again) and retries. */
export async function send(path, init = {}) {
  for (;;) {
    const response = await fetch(path, { ...init, headers: headers(init.headers) });
    if (response.status !== 401) return response;
    await askKey(Boolean(sessionStorage.getItem(KEY)));
  }
}

/** A JSON call; throws an Error carrying the server's message. ``signal``
 *  aborts it (the server then stops the work). */
export async function api(path, body, method, signal) {
  const init = body === undefined ? { method: method || "GET", signal }
    : { method: method || "POST", body: JSON.stringify(body), signal,
        headers: { "Content-Type": "application/json" } };
  const response = await send(path, init);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

/** POST ``body`` and call ``onEvent`` with each SSE event's JSON until [DONE].
 *  ``signal`` aborts it (the server then stops generating). */
export async function stream(path, body, onEvent, signal) {
  const response = await send(path, {
    method: "POST", body: JSON.stringify(body), signal,
    headers: { "Content-Type": "application/json" },
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const json = JSON.parse(data);
      if (json.error) throw new Error(json.error.message);
      onEvent(json);
    }
  }
}

/** Upload one file's bytes with progress (XMLHttpRequest: fetch reports none). */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
      xhr.onerror = () => reject(new Error("the upload failed (connection lost)"));
      xhr.onload = async () => {
        if (xhr.status === 401) {
          await askKey(Boolean(sessionStorage.getItem(KEY)));
          attempt();
          return;
        }
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else reject(new Error(body?.error?.message || `HTTP ${xhr.status}`));
      };
      xhr.send(file);
    };
    attempt();
  });
}
