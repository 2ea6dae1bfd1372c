//! A model folder or pack served over HTTP(S): `fetch` with Range headers in the browser (any
//! CORS-enabled server, e.g. the Hugging Face hub), `ureq` natively (TLS, redirects). Answers are
//! checked, not trusted: a range read takes a 206 whose Content-Range is the range asked for (or a
//! 200 where the range starts the file), and reads at most the bytes asked for, so a server that
//! ignores Range, answers another range, or sends a short, long or endless body gets a clear error
//! in bounded time and memory. A connection that stays silent for the stall timeout is abandoned.
//! Failed requests are retried with exponential backoff, except answers that will not change
//! (404, 403, a 200 that ignores Range, ...). Where the server states a file's sha256 (the hub's
//! `X-Linked-Etag` for LFS files), the file's bytes are hashed in order as reads reach them, and
//! [`HttpSource::check_stated`] compares.

use std::cell::RefCell;
use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::{sleep, Bytes};
use crate::error::{Error, Result};
use crate::weights::files::is_pickle;
use crate::weights::Source;

/// Reads of small ranges fetch ahead (one request per tensor would be thousands): a sixteenth of
/// the file, within these bounds.
const READ_AHEAD: (u64, u64) = (64 << 10, 16 << 20);
const RETRIES: u32 = 4;
const FIRST_BACKOFF_MS: u64 = 500;
/// A request whose server sends nothing for this long is abandoned (and retried).
const STALL_MS: u64 = 60_000;
/// How far a read may start past the bytes hashed so far and still have the gap fetched, to go on
/// hashing in order (integer buffers the converter skips): further, and the file is not checked.
const MAX_HASH_GAP: u64 = 16 << 20;
/// Bytes hashed at a time (copied out of JS memory in the browser).
const HASH_CHUNK: u64 = 16 << 20;

/// What a HEAD request tells of a file.
pub struct Head {
    /// None where the server says 404.
    pub length: Option<u64>,
    /// The sha256 the server states for the file (lowercase hex), if any.
    pub sha256: Option<String>,
}

/// The sha256 in an `X-Linked-Etag` / `ETag` value (`"hex"`, `W/"hex"`), where it is one: the hub
/// states an LFS file's sha256 so; other servers' tags (md5s, `mtime-size`) are not 64 hex digits.
fn stated_sha256(tag: &str) -> Option<String> {
    let hex = tag.trim().trim_start_matches("W/").trim_matches('"');
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

/// A file whose server states its sha256, hashed in order as reads reach its bytes.
struct Stated {
    sha256: String,
    /// Bytes hashed so far and the hash; None once a read skipped too far ahead (not checked).
    hashing: Option<(u64, Sha256)>,
}

/// What [`HttpSource::check_stated`] found among the files read: those whose bytes have the sha256
/// their server states (path, bytes), and those it states one for that were not read in order
/// (not checked).
#[derive(Debug, Default)]
pub struct StatedHashes {
    pub matched: Vec<(String, u64)>,
    pub unchecked: Vec<String>,
}

/// `owner/name` (a Hugging Face hub repository) as the URL its files resolve under, and
/// `owner/name/path/file` as that file's URL; `http(s)://` URLs as given, except that the hub's
/// `/blob/` pages become their `/resolve/` files.
pub fn hub_url(repo_or_url: &str) -> Result<String> {
    let s = repo_or_url.trim().trim_end_matches('/');
    if s.starts_with("http://") || s.starts_with("https://") {
        return Ok(match s.split_once("huggingface.co/") {
            Some((scheme, rest)) => format!("{scheme}huggingface.co/{}", rest.replacen("/blob/", "/resolve/", 1)),
            None => s.to_string(),
        });
    }
    let part = |p: &str| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [owner, name, file @ ..] if parts.iter().all(|p| part(p)) => {
            let file: String = file.iter().map(|f| format!("/{f}")).collect();
            Ok(format!("https://huggingface.co/{owner}/{name}/resolve/main{file}"))
        }
        _ => Err(Error::InvalidParameter(format!("'{repo_or_url}' is neither an http(s) URL nor a hub repository (owner/name[/file])"))),
    }
}

/// Whether a URL or path names a single-file checkpoint (rather than a folder or pack).
pub fn is_single_file(url: &str) -> bool {
    let name = url.rsplit('/').next().unwrap_or(url).split(['?', '#']).next().unwrap_or("").to_ascii_lowercase();
    name.ends_with(".safetensors") || name.ends_with(".gguf") || is_pickle(&name)
}

pub struct HttpSource {
    /// Ends without a slash; files are `{base}/{path}`.
    base: String,
    retries: u32,
    client: platform::Client,
    lengths: RefCell<HashMap<String, Option<u64>>>,
    stated: RefCell<HashMap<String, Stated>>,
    /// The last read-ahead window: (path, start, bytes).
    window: RefCell<Option<(String, u64, Bytes)>>,
    fetched: RefCell<u64>,
}

impl HttpSource {
    /// A folder or pack at `url` (`http(s)://...`, or a hub repository `owner/name`).
    pub fn new(url: &str) -> Result<HttpSource> {
        let base = hub_url(url)?;
        Ok(HttpSource {
            base,
            retries: RETRIES,
            client: platform::Client::new(STALL_MS),
            lengths: RefCell::default(),
            stated: RefCell::default(),
            window: RefCell::default(),
            fetched: RefCell::new(0),
        })
    }

    /// The folder or pack at `url`, or, for a single file's URL (see [`is_single_file`]), its
    /// folder and the file's name in it.
    pub fn for_url(url: &str) -> Result<(HttpSource, Option<String>)> {
        let full = hub_url(url)?;
        if !is_single_file(&full) {
            return Ok((HttpSource::new(&full)?, None));
        }
        let (base, file) = full.rsplit_once('/').expect("an http(s) URL has slashes");
        Ok((HttpSource::new(base)?, Some(file.to_string())))
    }

    /// Retries after a failure (tests use 0 to see failures at once).
    pub fn with_retries(mut self, retries: u32) -> HttpSource {
        self.retries = retries;
        self
    }

    /// Abandons a request after `ms` of silence from its server (tests use short ones).
    pub fn with_stall_timeout(mut self, ms: u64) -> HttpSource {
        self.client = platform::Client::new(ms);
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// Body bytes received so far (for throughput and for tests of what a resume re-fetches).
    pub fn bytes_fetched(&self) -> u64 {
        *self.fetched.borrow()
    }

    async fn retrying<T, F: std::future::Future<Output = Result<T>>>(&self, mut attempt: impl FnMut() -> F) -> Result<T> {
        let mut wait = FIRST_BACKOFF_MS;
        for _ in 0..self.retries {
            match attempt().await {
                Err(Error::Network { status, .. }) if status.is_none_or(|s| s == 408 || s == 429 || s >= 500) => {
                    sleep(wait).await;
                    wait *= 2;
                }
                other => return other,
            }
        }
        attempt().await
    }

    /// The length of `path`, or None where the server says 404.
    pub async fn length(&self, path: &str) -> Result<Option<u64>> {
        if let Some(&known) = self.lengths.borrow().get(path) {
            return Ok(known);
        }
        let url = self.url(path);
        let head = self.retrying(|| self.client.head(&url)).await?;
        if let (Some(_), Some(sha256)) = (head.length, head.sha256) {
            self.stated.borrow_mut().insert(path.to_string(), Stated { sha256, hashing: Some((0, Sha256::new())) });
        }
        self.lengths.borrow_mut().insert(path.to_string(), head.length);
        Ok(head.length)
    }

    /// Bytes `start..end` of `path`, exactly.
    pub async fn fetch(&self, path: &str, start: u64, end: u64) -> Result<Bytes> {
        self.fill_hash_gap(path, start).await?;
        let bytes = self.get(path, start, end).await?;
        self.hash_in_order(path, start, &bytes);
        Ok(bytes)
    }

    async fn get(&self, path: &str, start: u64, end: u64) -> Result<Bytes> {
        let url = self.url(path);
        // A Range header cannot name an empty range (bytes=start-(start-1)).
        if start >= end {
            return match start == end {
                true => Ok(Vec::new().into()),
                false => Err(Error::Network { url, status: None, message: format!("bytes {start}..{end} is not a range") }),
            };
        }
        let bytes = self.retrying(|| self.client.get(&url, start, end)).await?;
        *self.fetched.borrow_mut() += bytes.len();
        Ok(bytes)
    }

    /// Before a read that starts past the bytes of `path` hashed so far: fetches and hashes the
    /// gap where it is small, or gives up checking the file.
    async fn fill_hash_gap(&self, path: &str, start: u64) -> Result<()> {
        let hashed = match self.stated.borrow().get(path) {
            Some(Stated { hashing: Some((hashed, _)), .. }) if *hashed < start => *hashed,
            _ => return Ok(()),
        };
        if start - hashed > MAX_HASH_GAP {
            if let Some(stated) = self.stated.borrow_mut().get_mut(path) {
                stated.hashing = None;
            }
            return Ok(());
        }
        let gap = self.get(path, hashed, start).await?;
        self.hash_in_order(path, hashed, &gap);
        Ok(())
    }

    /// Hashes the part of `bytes` (from `start` in `path`) past the bytes hashed so far, where
    /// they continue them.
    fn hash_in_order(&self, path: &str, start: u64, bytes: &Bytes) {
        let mut stated = self.stated.borrow_mut();
        let Some(Stated { hashing: Some((hashed, hasher)), .. }) = stated.get_mut(path) else { return };
        let end = start + bytes.len();
        if start > *hashed || end <= *hashed {
            return;
        }
        let mut from = *hashed - start;
        while from < bytes.len() {
            let to = (from + HASH_CHUNK).min(bytes.len());
            hasher.update(bytes.slice(from, to));
            from = to;
        }
        *hashed = end;
    }

    /// Compares the files read whole, in order, with the sha256 their server states: a
    /// difference is [`Error::Corrupt`] (changed or damaged in transit).
    pub fn check_stated(&self) -> Result<StatedHashes> {
        let lengths = self.lengths.borrow();
        let mut found = StatedHashes::default();
        for (path, stated) in self.stated.borrow().iter() {
            let length = lengths.get(path).copied().flatten();
            match &stated.hashing {
                Some((hashed, hasher)) if Some(*hashed) == length => {
                    let got = hex::encode(hasher.clone().finalize());
                    if got != stated.sha256 {
                        return Err(Error::Corrupt {
                            path: self.url(path),
                            message: format!("the bytes received have sha256 {got}, not the {} the server states: the file changed or was damaged in transit; download again", stated.sha256),
                        });
                    }
                    found.matched.push((path.clone(), *hashed));
                }
                Some((0, _)) => {} // not read
                _ => found.unchecked.push(path.clone()),
            }
        }
        found.matched.sort();
        found.unchecked.sort();
        Ok(found)
    }
}

impl Source for HttpSource {
    fn describe(&self, path: &str) -> String {
        self.url(path)
    }
    async fn exists(&self, path: &str) -> bool {
        matches!(self.length(path).await, Ok(Some(_)))
    }
    async fn len(&self, path: &str) -> Result<u64> {
        self.length(path).await?.ok_or_else(|| Error::Network { url: self.url(path), status: Some(404), message: "not found".into() })
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        if let Some((p, at, bytes)) = &*self.window.borrow() {
            if p == path && start >= *at && end <= at + bytes.len() {
                return Ok(bytes.slice(start - at, end - at));
            }
        }
        let len = self.len(path).await?;
        if start > end || end > len {
            return Err(Error::Network { url: self.url(path), status: None, message: format!("bytes {start}..{end} out of range of {len}") });
        }
        let window = (len / 16).clamp(READ_AHEAD.0, READ_AHEAD.1);
        if end - start >= window {
            return Ok(self.fetch(path, start, end).await?.slice(0, end - start));
        }
        let ahead = (start + window).min(len);
        let bytes = self.fetch(path, start, ahead).await?;
        let out = bytes.slice(0, end - start);
        *self.window.borrow_mut() = Some((path.to_string(), start, bytes));
        Ok(out)
    }
}

/// Why a range answer is not the range `start..end`, once its headers are in (in the browser,
/// CORS may hide Content-Range: then a 206 is taken as the range).
fn range_answer_error(status: u16, content_range: Option<&str>, start: u64, end: u64) -> Option<(Option<u16>, String)> {
    match status {
        206 => match content_range {
            Some(range) if !range.trim().starts_with(&format!("bytes {start}-{}/", end - 1)) => {
                Some((None, format!("asked for bytes {start}-{}, the server answered '{range}'", end - 1)))
            }
            _ => None,
        },
        // The whole file: its first bytes are the range only where the range starts it.
        200 if start == 0 => None,
        200 => Some((Some(200), "the server ignores Range requests (it answered 200 with the whole file)".into())),
        _ => Some((Some(status), format!("HTTP {status}"))),
    }
}

#[cfg(target_arch = "wasm32")]
mod platform {
    use std::cell::Cell;

    use js_sys::Uint8Array;
    use wasm_bindgen::closure::Closure;
    use wasm_bindgen::JsCast;
    use wasm_bindgen_futures::JsFuture;
    use web_sys::{AbortController, Headers, ReadableStreamDefaultReader, ReadableStreamReadResult, RequestCache, RequestInit, Response};

    use super::super::js::{Global, JsFailure};
    use super::super::Bytes;
    use super::{range_answer_error, stated_sha256, Head};
    use crate::error::{Error, Result};

    /// The largest integer a JS number holds exactly.
    const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

    fn network(url: &str, f: JsFailure) -> Error {
        Error::Network { url: url.to_string(), status: f.status, message: f.message }
    }

    fn http_error(r: &Response) -> JsFailure {
        let status = Some(r.status()).filter(|&s| s > 0);
        JsFailure { status, ..JsFailure::new(format!("HTTP {} {}", r.status(), r.status_text()).trim()) }
    }

    fn header(r: &Response, name: &str) -> Option<String> {
        r.headers().get(name).ok().flatten()
    }

    /// Aborts a fetch after `stall_ms` of silence (headers or body). Dropped, it aborts the fetch
    /// too, so that a body left unread (a refused answer) stops downloading.
    struct Watchdog {
        global: Global,
        abort: AbortController,
        on_silence: Closure<dyn FnMut()>,
        timer: Cell<Option<i32>>,
        stall_ms: u64,
    }

    impl Watchdog {
        fn start(stall_ms: u64) -> std::result::Result<Watchdog, JsFailure> {
            let abort = AbortController::new()?;
            let on_silence = Closure::new({
                let abort = abort.clone();
                move || abort.abort()
            });
            let watchdog = Watchdog { global: Global::get()?, abort, on_silence, timer: Cell::new(None), stall_ms };
            watchdog.heard();
            Ok(watchdog)
        }

        /// The server sent something: its silence starts again.
        fn heard(&self) {
            if let Some(timer) = self.timer.take() {
                self.global.clear_timeout(timer);
            }
            self.timer.set(self.global.set_timeout(self.on_silence.as_ref().unchecked_ref(), self.stall_ms).ok());
        }

        fn stalled(&self) -> bool {
            self.abort.signal().aborted()
        }

        async fn fetch(&self, url: &str, init: &RequestInit) -> std::result::Result<Response, JsFailure> {
            init.set_cache(RequestCache::NoStore);
            init.set_signal(Some(&self.abort.signal()));
            self.global.fetch(url, init).await
        }

        /// `result`, except that whatever failed because the silence aborted the fetch failed
        /// for that; such a failure has no status, so the caller retries it.
        fn outcome<T>(&self, result: std::result::Result<T, JsFailure>) -> std::result::Result<T, JsFailure> {
            match result {
                Err(_) if self.stalled() => Err(JsFailure::new(format!("the server sent nothing for {} s", self.stall_ms as f64 / 1000.0))),
                other => other,
            }
        }
    }

    impl Drop for Watchdog {
        fn drop(&mut self) {
            if let Some(timer) = self.timer.take() {
                self.global.clear_timeout(timer);
            }
            self.abort.abort();
        }
    }

    /// `fetch`, with the stall timeout in milliseconds.
    pub struct Client(u64);

    impl Client {
        pub fn new(stall_ms: u64) -> Client {
            Client(stall_ms)
        }

        pub async fn head(&self, url: &str) -> Result<Head> {
            let watchdog = Watchdog::start(self.0).map_err(|f| network(url, f))?;
            let head = watchdog.outcome(head(&watchdog, url).await);
            head.map_err(|f| network(url, f))
        }

        pub async fn get(&self, url: &str, start: u64, end: u64) -> Result<Bytes> {
            let watchdog = Watchdog::start(self.0).map_err(|f| network(url, f))?;
            let bytes = watchdog.outcome(get(&watchdog, url, start, end).await);
            bytes.map(|array| Bytes { array }).map_err(|f| network(url, f))
        }
    }

    async fn head(watchdog: &Watchdog, url: &str) -> std::result::Result<Head, JsFailure> {
        let init = RequestInit::new();
        init.set_method("HEAD");
        let r = watchdog.fetch(url, &init).await?;
        if r.status() == 404 {
            return Ok(Head { length: None, sha256: None });
        }
        if !r.ok() {
            return Err(http_error(&r));
        }
        let length = header(&r, "content-length");
        let Some(n) = length.as_deref().and_then(|n| n.trim().parse().ok()).filter(|&n| n <= MAX_SAFE_INTEGER) else {
            return Err(JsFailure::new(format!("the response has no valid Content-Length ({})", length.as_deref().unwrap_or("null"))));
        };
        // The sha256 the server may state (the hub: X-Linked-Etag, where CORS shows it).
        let tag = header(&r, "x-linked-etag").or_else(|| header(&r, "etag"));
        Ok(Head { length: Some(n), sha256: tag.and_then(|t| stated_sha256(&t)) })
    }

    /// Bytes start..end, checked as the native client checks them ([`range_answer_error`]; CORS
    /// may hide Content-Range), and never more bytes than asked for: a 200 where the range starts
    /// the file is read no further than the range.
    async fn get(watchdog: &Watchdog, url: &str, start: u64, end: u64) -> std::result::Result<Uint8Array, JsFailure> {
        let headers = Headers::new()?;
        headers.set("Range", &format!("bytes={start}-{}", end - 1))?;
        let init = RequestInit::new();
        init.set_headers(&headers);
        let r = watchdog.fetch(url, &init).await?;
        watchdog.heard();
        let status = r.status();
        if status != 200 && status != 206 {
            return Err(http_error(&r));
        }
        if let Some((status, message)) = range_answer_error(status, header(&r, "content-range").as_deref(), start, end) {
            return Err(JsFailure { status, ..JsFailure::new(message) });
        }
        let want = end - start;
        let length = u32::try_from(want).map_err(|_| JsFailure::new(format!("a range of {want} bytes is more than one read can hold")))?;
        let bytes = Uint8Array::new_with_length(length);
        let mut got = 0;
        if let Some(body) = r.body() {
            let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
            loop {
                let chunk: ReadableStreamReadResult = match JsFuture::from(reader.read()).await {
                    Ok(chunk) => chunk.unchecked_into(),
                    Err(e) if watchdog.stalled() => return Err(e.into()),
                    Err(e) => return Err(JsFailure::new(format!("the transfer stopped after {got} of {want} bytes: {}", JsFailure::from(e).message))),
                };
                if chunk.get_done().unwrap_or(true) {
                    break;
                }
                watchdog.heard();
                let value: Uint8Array = chunk.get_value().unchecked_into();
                let n = value.length() as u64;
                if got + n > want {
                    let _ = reader.cancel();
                    if status == 206 {
                        return Err(JsFailure::new(format!("the server sent more than the {want} bytes asked for")));
                    }
                    bytes.set(&value.subarray(0, (want - got) as u32), got as u32);
                    got = want;
                    break;
                }
                bytes.set(&value, got as u32);
                got += n;
            }
        }
        if got != want {
            return Err(JsFailure::new(format!("the connection closed after {got} of {want} bytes")));
        }
        Ok(bytes)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod platform {
    use std::io::Read;
    use std::time::Duration;

    use super::super::Bytes;
    use super::{range_answer_error, stated_sha256, Head};
    use crate::error::{Error, Result};

    const MAX_REDIRECTS: u32 = 10;
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Where a redirect from `url` to `location` (absolute, or relative to `url`) leads.
    fn redirected(url: &str, location: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
        let origin = format!("{scheme}://{}", rest.split('/').next().unwrap_or(rest));
        if location.contains("://") {
            location.to_string()
        } else if let Some(host) = location.strip_prefix("//") {
            format!("{scheme}://{host}")
        } else if location.starts_with('/') {
            format!("{origin}{location}")
        } else {
            format!("{}/{location}", url.rsplit_once('/').map_or(url, |(dir, _)| dir))
        }
    }

    /// ureq over rustls: HTTPS, redirects, connections kept alive between range reads.
    pub struct Client(ureq::Agent);

    fn fail(url: &str, status: Option<u16>, message: impl ToString) -> Error {
        Error::Network { url: url.to_string(), status, message: message.to_string() }
    }

    impl Client {
        pub fn new(stall_ms: u64) -> Client {
            let stall = Some(Duration::from_millis(stall_ms));
            let config = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_recv_response(stall)
                .timeout_per_read(stall)
                .max_redirects(MAX_REDIRECTS)
                .build();
            Client(config.into())
        }

        /// Redirects are followed here, one at a time: the hub states an LFS file's sha256 on its
        /// own answer, the 302 to its CDN.
        pub async fn head(&self, url: &str) -> Result<Head> {
            let (mut url, mut sha256) = (url.to_string(), None);
            for _ in 0..=MAX_REDIRECTS {
                let response = self.0.head(&url).config().max_redirects(0).build().call().map_err(|e| fail(&url, None, e))?;
                let status = response.status().as_u16();
                let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                sha256 = sha256.or_else(|| header("x-linked-etag").or_else(|| header("etag")).and_then(|t| stated_sha256(&t)));
                if (300..400).contains(&status) {
                    let location = header("location").ok_or_else(|| fail(&url, Some(status), "a redirect without a Location"))?;
                    url = redirected(&url, &location);
                    continue;
                }
                let length = header("content-length").and_then(|v| v.trim().parse().ok());
                return match status {
                    404 => Ok(Head { length: None, sha256: None }),
                    200..=299 => length.map(|n| Head { length: Some(n), sha256 }).ok_or_else(|| fail(&url, Some(status), "no Content-Length")),
                    _ => Err(fail(&url, Some(status), format!("HTTP {status}"))),
                };
            }
            Err(fail(&url, None, format!("more than {MAX_REDIRECTS} redirects")))
        }

        pub async fn get(&self, url: &str, start: u64, end: u64) -> Result<Bytes> {
            let response = self.0.get(url).header("Range", format!("bytes={start}-{}", end - 1)).call().map_err(|e| fail(url, None, e))?;
            let status = response.status().as_u16();
            let range = response.headers().get("content-range").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            if let Some((status, message)) = range_answer_error(status, range.as_deref(), start, end) {
                return Err(fail(url, status, message));
            }
            let want = end - start;
            // One byte more than asked tells a long (or endless) body from a right one; a 200
            // is the whole file, of which the range is the start.
            let limit = if status == 206 { want + 1 } else { want };
            let mut body = Vec::new();
            let read = response.into_body().into_reader().take(limit).read_to_end(&mut body);
            if body.len() as u64 > want {
                return Err(fail(url, None, format!("the server sent more than the {want} bytes asked for")));
            }
            if let Err(e) = read {
                return Err(fail(url, None, format!("the transfer stopped after {} of {want} bytes: {e}", body.len())));
            }
            if (body.len() as u64) < want {
                return Err(fail(url, None, format!("the connection closed after {} of {want} bytes", body.len())));
            }
            Ok(Bytes::from(body))
        }
    }
}
