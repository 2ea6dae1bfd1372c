//! A model folder or pack served over HTTP: `fetch` with Range headers in the browser (any
//! CORS-enabled server, e.g. the Hugging Face hub), plain HTTP/1.1 over TCP natively (`http://`
//! only: natively, https downloads are left to other tools). Failed requests are retried with
//! exponential backoff, except answers that will not change (404, 403, ...).

use std::cell::RefCell;
use std::collections::HashMap;

use super::{sleep, Bytes};
use crate::error::{Error, Result};
use crate::weights::files::is_pickle;
use crate::weights::Source;

/// Reads of small ranges fetch ahead (one request per tensor would be thousands): a sixteenth of
/// the file, within these bounds.
const READ_AHEAD: (u64, u64) = (64 << 10, 16 << 20);
const RETRIES: u32 = 4;
const FIRST_BACKOFF_MS: u64 = 500;

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
    lengths: RefCell<HashMap<String, Option<u64>>>,
    /// The last read-ahead window: (path, start, bytes).
    window: RefCell<Option<(String, u64, Bytes)>>,
    fetched: RefCell<u64>,
}

impl HttpSource {
    /// A folder or pack at `url` (`http(s)://...`, or a hub repository `owner/name`).
    pub fn new(url: &str) -> Result<HttpSource> {
        let base = hub_url(url)?;
        Ok(HttpSource { base, retries: RETRIES, lengths: RefCell::default(), window: RefCell::default(), fetched: RefCell::new(0) })
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
        let length = self.retrying(|| platform::length(&url)).await?;
        self.lengths.borrow_mut().insert(path.to_string(), length);
        Ok(length)
    }

    /// Bytes `start..end` of `path`, exactly.
    pub async fn fetch(&self, path: &str, start: u64, end: u64) -> Result<Bytes> {
        let url = self.url(path);
        let bytes = self.retrying(|| platform::get(&url, start, end)).await?;
        *self.fetched.borrow_mut() += bytes.len();
        Ok(bytes)
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

#[cfg(target_arch = "wasm32")]
mod platform {
    use super::super::js::{self, JsFailure};
    use super::super::Bytes;
    use crate::error::{Error, Result};

    fn network(url: &str, e: wasm_bindgen::JsValue) -> Error {
        let f = JsFailure::from(e);
        Error::Network { url: url.to_string(), status: f.status, message: f.message }
    }

    pub async fn length(url: &str) -> Result<Option<u64>> {
        let n = js::http_length(url).await.map_err(|e| network(url, e))?.as_f64().unwrap_or(-1.0);
        Ok((n >= 0.0).then_some(n as u64))
    }

    pub async fn get(url: &str, start: u64, end: u64) -> Result<Bytes> {
        use wasm_bindgen::JsCast;
        let value = js::http_get(url, start as f64, end as f64).await.map_err(|e| network(url, e))?;
        Ok(Bytes { array: value.unchecked_into() })
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod platform {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use super::super::Bytes;
    use crate::error::{Error, Result};

    /// One HTTP/1.1 request: (status, content length, body).
    fn request(url: &str, method: &str, range: Option<(u64, u64)>) -> Result<(u16, Option<u64>, Vec<u8>)> {
        let fail = |status: Option<u16>, message: String| Error::Network { url: url.to_string(), status, message };
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            fail(Some(0), "the native downloader speaks plain http:// only; fetch https files with another tool and convert the folder".into())
        })?;
        let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
        let io = |e: std::io::Error| fail(None, e.to_string());
        let mut stream = TcpStream::connect(host).map_err(io)?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(io)?;
        let range = range.map_or(String::new(), |(s, e)| format!("Range: bytes={s}-{}\r\n", e - 1));
        write!(stream, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{range}\r\n").map_err(io)?;
        let mut response = Vec::new();
        // A dropped connection shows as a short body below, whatever read_to_end says.
        let _ = stream.read_to_end(&mut response);
        let head_end = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| fail(None, "the connection closed before the response headers".into()))?;
        let head = String::from_utf8_lossy(&response[..head_end]).to_string();
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| fail(None, format!("malformed status line '{}'", head.lines().next().unwrap_or(""))))?;
        let length = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        });
        let body = response.split_off(head_end + 4);
        if method != "HEAD" && length.is_some_and(|n| (body.len() as u64) < n) {
            return Err(fail(None, format!("the connection closed after {} of {} bytes", body.len(), length.unwrap_or(0))));
        }
        Ok((status, length, body))
    }

    pub async fn length(url: &str) -> Result<Option<u64>> {
        let (status, length, _) = request(url, "HEAD", None)?;
        match status {
            404 => Ok(None),
            200..=299 => length.map(Some).ok_or_else(|| Error::Network { url: url.into(), status: Some(status), message: "no Content-Length".into() }),
            _ => Err(Error::Network { url: url.into(), status: Some(status), message: format!("HTTP {status}") }),
        }
    }

    pub async fn get(url: &str, start: u64, end: u64) -> Result<Bytes> {
        let (status, _, mut body) = request(url, "GET", Some((start, end)))?;
        match status {
            206 => {}
            200 if body.len() as u64 >= end => body = body[start as usize..end as usize].to_vec(),
            _ => return Err(Error::Network { url: url.into(), status: Some(status), message: format!("HTTP {status}") }),
        }
        if body.len() as u64 != end - start {
            return Err(Error::Network { url: url.into(), status: None, message: format!("got {} of {} bytes", body.len(), end - start) });
        }
        Ok(Bytes::from(body))
    }
}
