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

export async function http_length(url) {
  const r = await fetch(url, { method: 'HEAD', cache: 'no-store' });
  if (r.status === 404) return -1;
  if (!r.ok) throw httpError(r);
  const n = r.headers.get('content-length');
  if (n === null) throw { status: 0, message: 'the response has no Content-Length' };
  return Number(n);
}

export async function http_get(url, start, end) {
  const r = await fetch(url, { headers: { Range: `bytes=${start}-${end - 1}` }, cache: 'no-store' });
  if (!r.ok) throw httpError(r);
  let bytes = new Uint8Array(await r.arrayBuffer());
  if (r.status === 200) bytes = bytes.slice(start, end); // the server ignored Range
  if (bytes.length !== end - start) throw { message: `got ${bytes.length} of ${end - start} bytes` };
  return bytes;
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
    pub async fn http_length(url: &str) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch)]
    pub async fn http_get(url: &str, start: f64, end: f64) -> Result<JsValue, JsValue>;
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
