//! The browser APIs the store uses, over web-sys, in a window and in a worker alike: the global
//! scope (fetch, timers, IndexedDB, WebCrypto, the storage manager), and [`JsFailure`] for what
//! they throw. Bytes stay JS `Uint8Array`s.

use js_sys::{Function, Promise, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbFactory, RequestInit, Response, StorageManager, SubtleCrypto, Window, WorkerGlobalScope};

/// The global scope: a page's window or a worker's.
pub enum Global {
    Window(Window),
    Worker(WorkerGlobalScope),
}

impl Global {
    pub fn get() -> Result<Global, JsFailure> {
        let global = js_sys::global();
        if let Some(window) = global.dyn_ref::<Window>() {
            return Ok(Global::Window(window.clone()));
        }
        global.dyn_into().map(Global::Worker).map_err(|_| JsFailure::new("the global scope is neither a window nor a worker"))
    }

    pub async fn fetch(&self, url: &str, init: &RequestInit) -> Result<Response, JsFailure> {
        let answer = match self {
            Global::Window(w) => w.fetch_with_str_and_init(url, init),
            Global::Worker(w) => w.fetch_with_str_and_init(url, init),
        };
        Ok(JsFuture::from(answer).await?.unchecked_into())
    }

    /// Calls `callback` after `ms`; the timer's handle, for [`Global::clear_timeout`].
    pub fn set_timeout(&self, callback: &Function, ms: u64) -> Result<i32, JsFailure> {
        let ms = i32::try_from(ms).unwrap_or(i32::MAX);
        Ok(match self {
            Global::Window(w) => w.set_timeout_with_callback_and_timeout_and_arguments_0(callback, ms)?,
            Global::Worker(w) => w.set_timeout_with_callback_and_timeout_and_arguments_0(callback, ms)?,
        })
    }

    pub fn clear_timeout(&self, handle: i32) {
        match self {
            Global::Window(w) => w.clear_timeout_with_handle(handle),
            Global::Worker(w) => w.clear_timeout_with_handle(handle),
        }
    }

    pub fn indexed_db(&self) -> Result<IdbFactory, JsFailure> {
        let factory = match self {
            Global::Window(w) => w.indexed_db()?,
            Global::Worker(w) => w.indexed_db()?,
        };
        factory.ok_or_else(|| JsFailure::new("this browser context has no IndexedDB"))
    }

    fn subtle_crypto(&self) -> Result<SubtleCrypto, JsFailure> {
        Ok(match self {
            Global::Window(w) => w.crypto()?.subtle(),
            Global::Worker(w) => w.crypto()?.subtle(),
        })
    }

    /// `navigator.storage`, where the context has one (secure contexts only).
    pub fn storage(&self) -> Option<StorageManager> {
        let storage = match self {
            Global::Window(w) => w.navigator().storage(),
            Global::Worker(w) => w.navigator().storage(),
        };
        (!storage.is_undefined()).then_some(storage)
    }
}

/// Waits `ms` milliseconds.
pub async fn sleep(ms: u64) {
    let Ok(global) = Global::get() else { return };
    let wait = Promise::new(&mut |resolve, _| {
        if global.set_timeout(&resolve, ms).is_err() {
            let _ = resolve.call0(&JsValue::UNDEFINED); // no timer: do not wait forever
        }
    });
    let _ = JsFuture::from(wait).await;
}

/// Lowercase hex sha256 by WebCrypto: native speed, and the bytes are hashed where they are (a
/// 64 MiB record never enters wasm memory); empty where WebCrypto fails (it matches no hash).
pub async fn sha256_hex(bytes: &Uint8Array) -> String {
    let digest = async {
        let digest = Global::get()?.subtle_crypto()?.digest_with_str_and_js_u8_array("SHA-256", bytes)?;
        Ok::<_, JsFailure>(Uint8Array::new(&JsFuture::from(digest).await?).to_vec())
    };
    digest.await.map(|d| d.iter().map(|b| format!("{b:02x}")).collect()).unwrap_or_default()
}

/// A failure of a browser API: the thrown value's (DOMException / Error) name and message, and an
/// HTTP status where a server's answer was refused.
pub struct JsFailure {
    pub name: String,
    pub message: String,
    pub status: Option<u16>,
}

impl JsFailure {
    pub fn new(message: impl Into<String>) -> JsFailure {
        JsFailure { name: String::new(), message: message.into(), status: None }
    }
}

impl From<JsValue> for JsFailure {
    fn from(e: JsValue) -> JsFailure {
        let text = |k: &str| js_sys::Reflect::get(&e, &JsValue::from_str(k)).ok().and_then(|v| v.as_string()).unwrap_or_default();
        let message = match text("message") {
            m if m.is_empty() => e.as_string().unwrap_or_else(|| format!("{e:?}")),
            m => m,
        };
        JsFailure { name: text("name"), message, status: None }
    }
}
