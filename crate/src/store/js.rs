//! The browser APIs the store uses (fetch, IndexedDB, WebCrypto, timers, files the user picked), as
//! small promise-returning JS functions that work in a window and in a worker. Bytes stay JS
//! `Uint8Array`s.

use js_sys::Uint8Array;
use wasm_bindgen::prelude::*;

#[wasm_bindgen(inline_js = r#"
export function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

export async function sha256(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

function httpError(r) { return { status: r.status, message: `HTTP ${r.status} ${r.statusText}`.trim() }; }

// A fetch abandoned after `stallMs` of silence (headers or body); the thrown value has no status,
// so the caller retries it.
async function silenceBounded(url, stallMs, work) {
  const abort = new AbortController();
  let timer;
  const heard = () => { clearTimeout(timer); timer = setTimeout(() => abort.abort(), stallMs); };
  heard();
  try {
    return await work(abort.signal, heard);
  } catch (e) {
    if (abort.signal.aborted) throw { message: `the server sent nothing for ${stallMs / 1000} s` };
    throw e;
  } finally {
    clearTimeout(timer);
    abort.abort(); // a body left unread (a refused answer) stops downloading
  }
}

export function http_head(url, stallMs) {
  return silenceBounded(url, stallMs, async (signal) => {
    const r = await fetch(url, { method: 'HEAD', cache: 'no-store', signal });
    if (r.status === 404) return { length: -1 };
    if (!r.ok) throw httpError(r);
    const n = Number(r.headers.get('content-length') ?? NaN);
    if (!Number.isSafeInteger(n) || n < 0) throw { status: 0, message: `the response has no valid Content-Length (${r.headers.get('content-length')})` };
    // The sha256 the server may state (the hub: X-Linked-Etag, where CORS shows it).
    return { length: n, tag: r.headers.get('x-linked-etag') ?? r.headers.get('etag') ?? undefined };
  });
}

// Bytes start..end, checked as the native client checks them (http.rs range_answer_error): a 206
// for this range (Content-Range, where CORS shows it), or a 200 where the range starts the file
// (read no further than the range); never more bytes than asked for.
export function http_get(url, start, end, stallMs) {
  return silenceBounded(url, stallMs, async (signal, heard) => {
    const r = await fetch(url, { headers: { Range: `bytes=${start}-${end - 1}` }, cache: 'no-store', signal });
    heard();
    const range = r.headers.get('content-range');
    if (r.status === 200 && start !== 0) throw { status: 200, message: 'the server ignores Range requests (it answered 200 with the whole file)' };
    if (r.status !== 200 && r.status !== 206) throw httpError(r);
    if (r.status === 206 && range !== null && !range.trim().startsWith(`bytes ${start}-${end - 1}/`)) {
      throw { message: `asked for bytes ${start}-${end - 1}, the server answered '${range}'` };
    }
    const want = end - start;
    const bytes = new Uint8Array(want);
    const reader = r.body.getReader();
    let got = 0;
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (signal.aborted) throw e;
        throw { message: `the transfer stopped after ${got} of ${want} bytes: ${e?.message ?? e}` };
      }
      const { done, value } = chunk;
      if (done) break;
      heard();
      if (got + value.length > want) {
        reader.cancel();
        if (r.status === 206) throw { message: `the server sent more than the ${want} bytes asked for` };
        bytes.set(value.subarray(0, want - got), got);
        got = want;
        break;
      }
      bytes.set(value, got);
      got += value.length;
    }
    if (got !== want) throw { message: `the connection closed after ${got} of ${want} bytes` };
    return bytes;
  });
}

function request(q) {
  return new Promise((resolve, reject) => { q.onsuccess = () => resolve(q.result); q.onerror = () => reject(q.error); });
}
function finished(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new DOMException('transaction aborted', 'AbortError'));
  });
}

export function idb_open(name) {
  return new Promise((resolve, reject) => {
    const q = indexedDB.open(name, 1);
    q.onupgradeneeded = () => { q.result.createObjectStore('records'); q.result.createObjectStore('sizes'); };
    q.onsuccess = () => resolve(q.result);
    q.onerror = () => reject(q.error);
    q.onblocked = () => reject(new Error(`IndexedDB '${name}' is held open by another tab`));
  });
}

export async function idb_get(db, key) {
  const value = await request(db.transaction('records', 'readonly').objectStore('records').get(key));
  return value === undefined ? undefined : new Uint8Array(value);
}

export async function idb_put(db, key, bytes) {
  const tx = db.transaction(['records', 'sizes'], 'readwrite');
  // Store exactly these bytes: cloning a view would clone its whole buffer.
  const whole = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength;
  tx.objectStore('records').put(whole ? bytes.buffer : bytes.slice().buffer, key);
  tx.objectStore('sizes').put(bytes.length, key);
  await finished(tx);
}

export async function idb_delete(db, key) {
  const tx = db.transaction(['records', 'sizes'], 'readwrite');
  tx.objectStore('records').delete(key);
  tx.objectStore('sizes').delete(key);
  await finished(tx);
}

export async function idb_list(db, prefix) {
  const store = db.transaction('sizes', 'readonly').objectStore('sizes');
  const range = IDBKeyRange.bound(prefix, prefix + '\uffff');
  const [keys, sizes] = await Promise.all([request(store.getAllKeys(range)), request(store.getAll(range))]);
  return keys.map((key, i) => [key, sizes[i]]);
}

export async function blob_read(blob, start, end) {
  return new Uint8Array(await blob.slice(start, end).arrayBuffer());
}

export async function storage_available() {
  const storage = globalThis.navigator?.storage;
  if (!storage?.estimate) return -1;
  const { quota, usage } = await storage.estimate();
  return quota === undefined ? -1 : Math.max(0, quota - (usage ?? 0));
}

export async function storage_persist() {
  try { return Boolean(await globalThis.navigator?.storage?.persist?.()); } catch { return false; }
}

"#)]
extern "C" {
    #[wasm_bindgen(js_name = sleep)]
    async fn js_sleep(ms: f64);
    #[wasm_bindgen(js_name = sha256)]
    async fn js_sha256(bytes: &Uint8Array) -> JsValue;
    #[wasm_bindgen(catch)]
    pub async fn http_head(url: &str, stall_ms: f64) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn http_get(url: &str, start: f64, end: f64, stall_ms: f64) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn idb_open(name: &str) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn idb_get(db: &JsValue, key: &str) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn idb_put(db: &JsValue, key: &str, bytes: &Uint8Array) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn idb_delete(db: &JsValue, key: &str) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn idb_list(db: &JsValue, prefix: &str) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn blob_read(blob: &JsValue, start: f64, end: f64) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn storage_available() -> Result<JsValue, JsValue>;
    pub async fn storage_persist() -> JsValue;
}

pub async fn sleep(ms: u64) {
    js_sleep(ms as f64).await;
}

pub async fn sha256_hex(bytes: &Uint8Array) -> String {
    js_sha256(bytes).await.as_string().unwrap_or_default()
}

/// A thrown JS value as (DOMException / Error name, message, HTTP status).
pub struct JsFailure {
    pub name: String,
    pub message: String,
    pub status: Option<u16>,
}

impl From<JsValue> for JsFailure {
    fn from(e: JsValue) -> JsFailure {
        let field = |k: &str| js_sys::Reflect::get(&e, &JsValue::from_str(k)).ok();
        let text = |k: &str| field(k).and_then(|v| v.as_string()).unwrap_or_default();
        let message = match text("message") {
            m if m.is_empty() => e.as_string().unwrap_or_else(|| format!("{e:?}")),
            m => m,
        };
        let status = field("status").and_then(|v| v.as_f64()).filter(|&s| s > 0.0).map(|s| s as u16);
        JsFailure { name: text("name"), message, status }
    }
}
