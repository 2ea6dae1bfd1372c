//! The model store over real HTTP (tests/server.py: Range requests, dropped connections, a request
//! log): download of a pack and of a diffusers folder, load → generate equal to the native CLI,
//! resume after an interruption fetching only what is missing, repair of a damaged record, running
//! out of space, delete. Natively on a DirStore with a server started here; in Chromium (a dedicated
//! worker, as the page runs it) on IndexedDB with the server tests/run.sh starts.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::psnr;
use sdxl::pack::Manifest;
use sdxl::pipeline::generate::{generate, GenerateParams, SdxlModel};
use sdxl::quant::QuantPreset;
use sdxl::store::{Bytes, DownloadOptions, HttpSource, FileStore, ModelStore, RecordStore, FILE_RECORD};
use sdxl::weights::lora::LoraFile;
use sdxl::weights::safetensors::serialize_f32;
use sdxl::weights::{FileTensors, MemorySource, Source};
use sdxl::{Error, Gpu, Precision};
use serde::Deserialize;

#[cfg(not(target_arch = "wasm32"))]
mod platform {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::{Mutex, MutexGuard, OnceLock};

    pub type Store = sdxl::store::DirStore;

    /// Builds the served fixtures with the CLI and starts the server (it exits when this process does).
    pub fn server() -> &'static str {
        static SERVER: OnceLock<(String, std::process::ChildStdin)> = OnceLock::new();
        &SERVER
            .get_or_init(|| {
                let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
                let out = format!("{}/store", env!("CARGO_TARGET_TMPDIR"));
                let status = Command::new("bash").arg(format!("{root}/tests/store_fixtures.sh")).arg(&out).env("SDXL", env!("CARGO_BIN_EXE_sdxl")).status().unwrap();
                assert!(status.success(), "tests/store_fixtures.sh failed");
                let mut child = Command::new("python3")
                    .arg(format!("{root}/tests/server.py"))
                    .args(["--exit-with-stdin", "--mount", &format!("/diffusers={root}/tests/fixtures/tiny-sdxl-base")])
                    .args(["--mount", &format!("/pack={out}/pack"), "--mount", &format!("/expected={out}/expected")])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("python3 runs tests/server.py");
                let mut url = String::new();
                BufReader::new(child.stdout.take().unwrap()).read_line(&mut url).unwrap();
                (url.trim().to_string(), child.stdin.take().unwrap())
            })
            .0
    }

    pub async fn store(name: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("sdxl-store-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        sdxl::store::DirStore::new(dir)
    }

    /// The server's fault injection and request log are shared: one test at a time.
    pub fn serial() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(target_arch = "wasm32")]
mod platform {
    pub type Store = sdxl::store::IdbStore;

    pub fn server() -> &'static str {
        option_env!("SDXL_TEST_SERVER").expect("SDXL_TEST_SERVER: the URL of tests/server.py, set by tests/run.sh")
    }

    pub async fn store(name: &str) -> Store {
        sdxl::store::IdbStore::open(&format!("sdxl-test-{name}-{}", js_sys::Date::now())).await.unwrap()
    }
}

use platform::{server, store};

const PROMPT: &str = "a red fox in the snow";

fn url(path: &str) -> String {
    format!("{}/{path}", server())
}

fn options() -> DownloadOptions {
    DownloadOptions { retries: 0, shard_bytes: 1 << 20, ..DownloadOptions::new(QuantPreset::Q8) }
}

async fn get(path: &str) -> Vec<u8> {
    HttpSource::new(server()).unwrap().with_retries(0).read(path).await.unwrap()
}

#[derive(Deserialize)]
struct Request {
    path: String,
    start: u64,
    end: u64,
}

async fn reset() {
    get("_control/reset").await;
}

/// Requests under `prefix` for bytes from `from` on send `after` bytes, then drop the connection.
async fn fail(prefix: &str, from: u64, after: u64) {
    get(&format!("_control/fail?prefix={prefix}&from={from}&after={after}&times=1000")).await;
}

/// The next request under `prefix` answers wrongly as `mode` says (tests/server.py).
async fn fault(prefix: &str, mode: &str, after: u64) {
    get(&format!("_control/fail?prefix={prefix}&mode={mode}&after={after}&times=1")).await;
}

fn now_ms() -> f64 {
    #[cfg(target_arch = "wasm32")]
    return js_sys::Date::now();
    #[cfg(not(target_arch = "wasm32"))]
    return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() * 1e3;
}

/// GET requests since the last reset.
async fn requests() -> Vec<Request> {
    serde_json::from_slice(&get("_control/log").await).unwrap()
}

/// Paths of the pack's shards fetched since the last reset, with their counts.
async fn shards_fetched() -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests().await {
        if let Some(shard) = r.path.strip_prefix("/pack/") {
            if shard.starts_with("shards/") {
                *counts.entry(shard.to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

async fn served_manifest() -> Manifest {
    serde_json::from_slice(&get("pack/manifest.json").await).unwrap()
}

async fn stored_shards(store: &ModelStore<impl RecordStore>, id: &str) -> BTreeSet<String> {
    let prefix = format!("{id}/");
    let records = store.records().list(&format!("{id}/shards/")).await.unwrap();
    records.into_iter().map(|(k, _)| k[prefix.len()..].to_string()).collect()
}

/// Downloads `path` as "tiny" with the connection dropped `from` bytes into the files under
/// `cut`: a NetworkError, and an incomplete model that does not open. Returns the shards stored.
async fn interrupted_download(store: &ModelStore<impl RecordStore>, path: &str, cut: &str, from: u64) -> BTreeSet<String> {
    reset().await;
    fail(cut, from, 1000).await;
    assert_eq!(kind(&store.download("tiny", &url(path), &options(), |_| {}).await), "NetworkError");
    let listed = store.list().await.unwrap();
    assert!(listed.len() == 1 && !listed[0].complete, "{listed:?}");
    assert_eq!(kind(&store.open("tiny", &|_| {}).await.map(drop)), "ModelIncomplete");
    let stored = stored_shards(store, "tiny").await;
    reset().await;
    stored
}

fn kind<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => panic!("expected an error, got success"),
        Err(e) => e.kind(),
    }
}

/// Overwrites a record with other bytes of the same length.
async fn damage(records: &impl RecordStore, key: &str) {
    let bytes = records.get(key).await.unwrap().expect("the record to damage");
    let mut data = bytes.slice(0, bytes.len());
    data.iter_mut().step_by(97).for_each(|b| *b ^= 0x5a);
    records.put(key, &Bytes::from(data)).await.unwrap();
}

async fn download_pack_load_and_generate() {
    let store = ModelStore::new(store("pack").await);
    reset().await;
    let mut stages = BTreeSet::new();
    let manifest = store.download("tiny", &url("pack"), &options(), |p| {
        stages.insert(p.stage);
    }).await.unwrap();
    assert!(stages.contains("download"), "progress stages {stages:?}");
    assert_eq!(manifest, served_manifest().await);
    assert!(manifest.shards.len() >= 5, "the fixture pack should span several records");
    let fetched = shards_fetched().await;
    assert!(manifest.shards.iter().all(|s| fetched.get(&s.path) == Some(&1)), "each shard fetched once: {fetched:?}");

    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].complete && listed[0].id == "tiny" && listed[0].quant.as_deref() == Some("q8"));
    assert_eq!(listed[0].total_bytes, Some(manifest.bytes()));
    assert!(store.verify("tiny").await.unwrap().is_empty());

    // Load record by record and generate: the native CLI's image of the same pack.
    let gpu = Gpu::new(Precision::F32).await.unwrap();
    let (stored, _) = store.open("tiny", &|_| {}).await.unwrap();
    let model = SdxlModel::load(&gpu, &stored, &QuantPreset::Q8.policy()).await.unwrap();
    let params = GenerateParams { prompt: PROMPT.into(), width: 64, height: 64, steps: 4, guidance: 5.0, seed: 7, ..GenerateParams::default() };
    let image = gpu.read(&generate(&gpu, &model, None, &params, |_| {}).await.unwrap().image).await.unwrap();
    let mut expected = MemorySource::default();
    expected.insert("image.safetensors", get("expected/image.safetensors").await);
    let tensors = FileTensors::open(&expected, vec!["image.safetensors".into()]).await.unwrap();
    let want = tensors.host("image", &[1, 3, 64, 64]).await.unwrap();
    let db = psnr(&image, &want);
    assert!(db >= 40.0, "image from the store vs the native CLI: {db:.1} dB < 40 dB");
    store.delete_all().await.unwrap();
}

async fn download_folder_converts_as_the_cli() {
    let store = ModelStore::new(store("folder").await);
    let manifest = store.download("tiny", &url("diffusers"), &options(), |_| {}).await.unwrap();
    // Same encoder, same record size: the records the CLI's `sdxl convert` wrote, byte for byte.
    assert_eq!(manifest, served_manifest().await);
    assert!(store.list().await.unwrap()[0].complete);
    assert!(store.verify("tiny").await.unwrap().is_empty());
    store.delete_all().await.unwrap();
}

async fn interrupted_pack_download_resumes() {
    let store = ModelStore::new(store("resume").await);
    let before = interrupted_download(&store, "pack", "/pack/shards/00003.bin", 0).await;
    assert!(!before.contains("shards/00003.bin"), "the cut shard must not be stored: {before:?}");
    let manifest = store.download("tiny", &url("pack"), &options(), |_| {}).await.unwrap();
    let fetched = shards_fetched().await;
    for shard in &manifest.shards {
        let n = fetched.get(&shard.path).copied().unwrap_or(0);
        let want = usize::from(!before.contains(&shard.path));
        assert_eq!(n, want, "{}: fetched {n} times on resume (stored before: {})", shard.path, want == 0);
    }
    assert!(store.verify("tiny").await.unwrap().is_empty());
    store.delete_all().await.unwrap();
}

async fn interrupted_conversion_resumes() {
    let store = ModelStore::new(store("resume-folder").await);
    let before = interrupted_download(&store, "diffusers", "/diffusers/unet/diffusion_pytorch_model.safetensors", 500_000).await;
    assert!(before.len() >= 3, "the text encoders' records are stored before the UNet: {before:?}");
    let manifest = store.download("tiny", &url("diffusers"), &options(), |_| {}).await.unwrap();
    assert_eq!(manifest, served_manifest().await);
    // The tokenizers lie in records stored before the cut: not fetched again.
    let again: Vec<String> = requests().await.into_iter().filter(|r| r.path.contains("/tokenizer")).map(|r| format!("{} {}..{}", r.path, r.start, r.end)).collect();
    assert!(again.is_empty(), "resume fetched files it had stored: {again:?}");
    assert!(store.verify("tiny").await.unwrap().is_empty());
    assert!(store.records().get("tiny/checkpoint.json").await.unwrap().is_none(), "the checkpoint goes once the model is complete");
    store.delete_all().await.unwrap();
}

async fn damaged_records_are_fetched_again() {
    let store = ModelStore::new(store("repair").await);
    store.download("pack", &url("pack"), &options(), |_| {}).await.unwrap();
    damage(store.records(), "pack/shards/00002.bin").await;
    assert_eq!(store.verify("pack").await.unwrap(), vec!["shards/00002.bin".to_string()]);
    reset().await;
    store.download("pack", &url("pack"), &options(), |_| {}).await.unwrap();
    assert_eq!(shards_fetched().await.into_iter().collect::<Vec<_>>(), vec![("shards/00002.bin".to_string(), 1)]);
    assert!(store.verify("pack").await.unwrap().is_empty());

    // A converted model's record is rebuilt from the tensors it holds.
    store.download("folder", &url("diffusers"), &options(), |_| {}).await.unwrap();
    damage(store.records(), "folder/shards/00004.bin").await;
    store.records().delete("folder/shards/00006.bin").await.unwrap();
    assert_eq!(store.verify("folder").await.unwrap(), vec!["shards/00004.bin".to_string(), "shards/00006.bin".to_string()]);
    assert_eq!(kind(&store.open("folder", &|_| {}).await.map(drop)), "ModelIncomplete");
    store.download("folder", &url("diffusers"), &options(), |_| {}).await.unwrap();
    assert!(store.verify("folder").await.unwrap().is_empty());
    store.delete_all().await.unwrap();
}

/// Every record is checked as it loads: a same-size damaged record fails every load (not a
/// sample of them), until a download repairs it.
async fn a_damaged_record_fails_every_load() {
    let store = ModelStore::new(store("damaged").await);
    store.download("tiny", &url("pack"), &options(), |_| {}).await.unwrap();
    damage(store.records(), "tiny/shards/00002.bin").await;
    assert!(store.list().await.unwrap()[0].complete, "same sizes: complete by the records' sizes");
    let gpu = Gpu::new(Precision::F32).await.unwrap();
    let load = || async {
        let (stored, _) = store.open("tiny", &|_| {}).await?;
        SdxlModel::load(&gpu, &stored, &QuantPreset::Q8.policy()).await.map(drop)
    };
    for _ in 0..4 {
        let loaded = load().await;
        assert!(loaded.as_ref().is_err_and(|e| e.kind() == "CorruptWeights" && e.to_string().contains("shards/00002.bin")), "{:?}", loaded.err());
    }
    store.download("tiny", &url("pack"), &options(), |_| {}).await.unwrap();
    load().await.unwrap();
    store.delete_all().await.unwrap();
}

/// A pack updated at its URL: the stored model is incomplete until every new record is in, so
/// an interrupted update never leaves old and new records loading together.
async fn an_interrupted_pack_update_never_mixes_versions() {
    let store = ModelStore::new(store("update").await);
    store.download("tiny", &url("pack"), &options(), |_| {}).await.unwrap();
    // The stored model becomes an older version of the pack: shards 2 and 3 differ.
    let records = store.records();
    let stored = |key: &'static str| async move {
        let bytes = records.get(key).await.unwrap().expect(key);
        bytes.slice(0, bytes.len())
    };
    let mut old: serde_json::Value = serde_json::from_slice(&stored("tiny/manifest.json").await).unwrap();
    for shard in [2, 3] {
        let key = format!("tiny/shards/{shard:05}.bin");
        damage(store.records(), &key).await;
        let sum = store.records().get(&key).await.unwrap().unwrap().sha256().await;
        old["shards"][shard]["sha256"] = sum.into();
    }
    store.records().put("tiny/manifest.json", &Bytes::from(serde_json::to_vec(&old).unwrap())).await.unwrap();
    assert!(store.verify("tiny").await.unwrap().is_empty(), "the old version is whole");

    reset().await;
    fail("/pack/shards/00003.bin", 0, 100).await;
    assert_eq!(kind(&store.download("tiny", &url("pack"), &options(), |_| {}).await), "NetworkError");
    assert!(!store.list().await.unwrap()[0].complete, "an interrupted update leaves the model incomplete");
    assert_eq!(kind(&store.open("tiny", &|_| {}).await.map(drop)), "ModelIncomplete");
    reset().await;
    store.download("tiny", &url("pack"), &options(), |_| {}).await.unwrap();
    assert!(store.list().await.unwrap()[0].complete && store.verify("tiny").await.unwrap().is_empty());
    assert_eq!(stored("tiny/manifest.json").await, get("pack/manifest.json").await);
    store.delete_all().await.unwrap();
}

/// Downloads `path` as `id`; the source files the download reports as having their stated sha256.
async fn checked_sources(store: &ModelStore<impl RecordStore>, id: &str, path: &str) -> Vec<String> {
    let mut checked = Vec::new();
    let report = |p: &sdxl::store::Progress| {
        if p.stage == "verify" && p.detail.contains("sha256") {
            checked.push(p.detail.split(':').next().unwrap_or_default().to_string());
        }
    };
    store.download(id, &url(path), &options(), report).await.unwrap();
    checked
}

/// A folder's files are checked against the sha256 their server states (X-Linked-Etag, as the hub
/// states an LFS file's): bytes that differ leave the model incomplete with a CorruptWeights error
/// naming the file; with the true hashes the download completes and reports the files checked.
async fn source_bytes_are_checked_against_stated_hashes() {
    let store = ModelStore::new(store("stated").await);
    reset().await;
    let unet = "/diffusers/unet/diffusion_pytorch_model.safetensors";
    get(&format!("_control/etag?prefix={unet}&value={}", "0".repeat(64))).await;
    let wrong = store.download("tiny", &url("diffusers"), &options(), |_| {}).await;
    let names_it = |e: &Error| e.kind() == "CorruptWeights" && e.to_string().contains("unet/diffusion_pytorch_model.safetensors") && e.to_string().contains("the server states");
    assert!(wrong.as_ref().is_err_and(names_it), "{:?}", wrong.err());
    assert!(!store.list().await.unwrap()[0].complete, "a source that differs from its stated hash leaves the model incomplete");
    assert_eq!(kind(&store.open("tiny", &|_| {}).await.map(drop)), "ModelIncomplete");

    reset().await;
    let checked = checked_sources(&store, "tiny", "diffusers").await;
    for file in ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"] {
        assert!(checked.iter().any(|c| c == file), "{file} checked: {checked:?}");
    }
    assert!(store.list().await.unwrap()[0].complete && store.verify("tiny").await.unwrap().is_empty());

    // As the hub: the hash stated on the redirect only, not by the server it leads to. Natively
    // it is read there; the browser sees the last answer's headers only.
    reset().await;
    get("_control/etag?prefix=/diffusers/&value=").await;
    let checked = checked_sources(&store, "redirected", "_redirect/diffusers").await;
    let want = !cfg!(target_arch = "wasm32");
    assert_eq!(checked.iter().any(|c| c == "unet/diffusion_pytorch_model.safetensors"), want, "checked through the redirect: {checked:?}");
    reset().await;
    store.delete_all().await.unwrap();
}

/// A store whose writes fail once `limit` bytes are stored although it reports no shortage up
/// front: the browser's estimate said yes, then a write hit the quota.
struct FullAfter<R: RecordStore> {
    inner: R,
    limit: u64,
}

impl<R: RecordStore> RecordStore for FullAfter<R> {
    fn describe(&self, key: &str) -> String {
        self.inner.describe(key)
    }
    async fn get(&self, key: &str) -> sdxl::Result<Option<Bytes>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, bytes: &Bytes) -> sdxl::Result<()> {
        let used: u64 = self.inner.list("").await?.iter().map(|(_, n)| n).sum();
        if used + bytes.len() > self.limit {
            return Err(Error::QuotaExceeded(format!("{key}: simulated full storage")));
        }
        self.inner.put(key, bytes).await
    }
    async fn delete(&self, key: &str) -> sdxl::Result<()> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> sdxl::Result<Vec<(String, u64)>> {
        self.inner.list(prefix).await
    }
    async fn available(&self) -> sdxl::Result<Option<u64>> {
        self.inner.available().await
    }
}

async fn running_out_of_space_leaves_no_model_complete() {
    let size = served_manifest().await.bytes();
    // Known up front: refused before fetching anything.
    let store = ModelStore::new(store("quota").await.with_quota(size / 2));
    reset().await;
    let result = store.download("tiny", &url("pack"), &options(), |_| {}).await;
    assert_eq!(kind(&result), "QuotaExceeded");
    let message = result.unwrap_err().to_string();
    assert!(message.contains("MiB") && message.contains("available"), "the error gives the numbers: {message}");
    assert!(shards_fetched().await.is_empty());
    store.delete_all().await.unwrap();

    // Hit mid-way: an error, no manifest, the partial records kept until deleted.
    let store = ModelStore::new(FullAfter { inner: platform::store("quota-midway").await, limit: size / 2 });
    assert_eq!(kind(&store.download("tiny", &url("pack"), &options(), |_| {}).await), "QuotaExceeded");
    let listed = store.list().await.unwrap();
    assert!(listed.len() == 1 && !listed[0].complete && listed[0].stored_bytes > 0, "{listed:?}");
    assert_eq!(kind(&store.open("tiny", &|_| {}).await.map(drop)), "ModelIncomplete");
    assert!(store.records().get("tiny/manifest.json").await.unwrap().is_none());
    assert_eq!(store.delete("tiny").await.unwrap(), listed[0].stored_bytes);
    assert!(store.list().await.unwrap().is_empty());
}

async fn delete_frees_the_space() {
    let store = ModelStore::new(store("delete").await);
    store.download("a", &url("pack"), &options(), |_| {}).await.unwrap();
    store.download("b", &url("pack"), &options(), |_| {}).await.unwrap();
    let listed = store.list().await.unwrap();
    assert_eq!(listed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(store.delete("a").await.unwrap(), listed[0].stored_bytes);
    assert!(store.records().list("a/").await.unwrap().is_empty());
    assert_eq!(store.list().await.unwrap().len(), 1);
    assert_eq!(kind(&store.open("a", &|_| {}).await.map(drop)), "ModelIncomplete");
    assert_eq!(store.delete_all().await.unwrap(), listed[1].stored_bytes);
    assert!(store.records().list("").await.unwrap().is_empty());
}

async fn bad_requests_get_clear_errors() {
    let store = ModelStore::new(store("bad").await);
    assert_eq!(kind(&store.download("../up", &url("pack"), &options(), |_| {}).await), "InvalidParameter");
    assert_eq!(kind(&store.download("x", &url("nothing-here"), &options(), |_| {}).await), "NetworkError");
    assert_eq!(kind(&store.download("x", "not a url", &options(), |_| {}).await), "InvalidParameter");
    let q4 = DownloadOptions::new(QuantPreset::Q4);
    assert_eq!(kind(&store.download("x", &url("pack"), &q4, |_| {}).await), "InvalidParameter");
    store.download("x", &url("pack"), &options(), |_| {}).await.unwrap();
    let other = store.download("x", &url("diffusers"), &options(), |_| {}).await;
    assert!(other.as_ref().is_err_and(|e| e.to_string().contains("already holds")), "{:?}", other.err());
    assert_eq!(kind(&store.open("missing", &|_| {}).await.map(drop)), "ModelIncomplete");
    store.delete_all().await.unwrap();
}

/// Range reads answered wrongly (tests/server.py's fault modes) get a NetworkError that says what
/// was wrong, without reading past the bytes asked for; valid answers (chunked, redirected, a
/// 200 from the file's start) give the bytes; a stalled server is abandoned and retried.
async fn bad_http_answers_get_clear_errors() {
    let (path, start, end) = ("pack/shards/00001.bin", 1000, 5000);
    let whole = get(path).await;
    let http = || HttpSource::new(server()).unwrap().with_retries(0);
    let cases = [
        ("ignore-range", 0, Some("ignores Range requests")),
        ("wrong-range", 0, Some("the server answered 'bytes 1001-5000/")),
        ("long", 100, Some("more than the 4000 bytes asked for")),
        ("endless", 0, Some("more than the 4000 bytes asked for")),
        // (Chromium may drop the 10 bytes sent before the connection closed.)
        ("drop", 10, Some("of 4000 bytes")),
        ("chunked", 0, None),
    ];
    for (mode, after, error) in cases {
        reset().await;
        fault(&format!("/{path}"), mode, after).await;
        let started = now_ms();
        let got = http().fetch(path, start, end).await;
        let seconds = (now_ms() - started) / 1e3;
        assert!(seconds < 10.0, "{mode}: {seconds:.1} s");
        match (error, got) {
            (Some(want), Err(e)) => assert!(e.kind() == "NetworkError" && e.to_string().contains(want), "{mode}: {e}"),
            (None, Ok(bytes)) => assert_eq!(bytes.slice(0, bytes.len()), &whole[start as usize..end as usize], "{mode}"),
            (_, got) => panic!("{mode}: {:?}", got.map(|b| b.len())),
        }
    }
    reset().await;
    // A 200 where the range starts the file: its first bytes, read no further.
    fault(&format!("/{path}"), "ignore-range", 0).await;
    assert_eq!(http().fetch(path, 0, 100).await.unwrap().slice(0, 100), &whole[..100]);
    // Redirects are followed (the hub answers 302 to its CDN).
    let redirected = http().fetch(&format!("_redirect/{path}"), start, end).await.unwrap();
    assert_eq!(redirected.slice(0, redirected.len()), &whole[start as usize..end as usize]);
    // Headers, then 8 s of silence: abandoned after 1 s and retried.
    fault(&format!("/{path}"), "stall", 8).await;
    let started = now_ms();
    let got = http().with_retries(1).with_stall_timeout(1000).fetch(path, start, end).await.unwrap();
    let seconds = (now_ms() - started) / 1e3;
    assert!(seconds < 5.0, "the stalled request was given up after {seconds:.1} s");
    assert_eq!(got.slice(0, got.len()), &whole[start as usize..end as usize]);
    reset().await;
    // An empty range asks nothing (no Range header can name it); a reversed one is refused.
    assert!(http().fetch(path, end, end).await.unwrap().is_empty());
    assert!(http().fetch(path, end, start).await.is_err_and(|e| e.kind() == "NetworkError"), "a reversed range");
}

/// A LoRA file of two records and a bit (its factors need not fit a model to be stored).
fn big_lora() -> Vec<u8> {
    let columns = (FILE_RECORD as usize * 2 + 4096) / 4 / 8 + 1;
    let down: Vec<f32> = (0..8 * columns).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let up = vec![0.5f32; 16 * 8];
    serialize_f32(&[("lora_unet_a.lora_down.weight", vec![8, columns], &down), ("lora_unet_a.lora_up.weight", vec![16, 8], &up), ("lora_unet_a.alpha", vec![], &[4.0])])
}

async fn loras_are_stored_as_files_and_checked() {
    let store = FileStore::new(store("loras").await);
    let bytes = big_lora();
    let mut files = MemorySource::default();
    files.insert("style.safetensors", bytes.clone());
    files.insert("vae.safetensors", serialize_f32(&[("decoder.conv_in.weight", vec![2, 2], &[1.0; 4])]));
    files.insert("lora.ckpt", vec![0x80, 2, 0x7d, 0x71]);

    let mut last = (0, 0);
    let stored = store.store("style", "memory:style", &files, "style.safetensors", |done, total| last = (done, total)).await.unwrap();
    assert_eq!(last, (bytes.len() as u64, bytes.len() as u64), "progress reaches the end");
    let hash = LoraFile::open(&files, "style.safetensors").await.unwrap().short_hash().await.unwrap();
    assert_eq!((stored.complete, stored.hash.as_deref(), stored.file.as_deref()), (true, Some(hash.as_str()), Some("style.safetensors")));
    assert_eq!(store.records().list("style/data/").await.unwrap().len(), 3);

    let (source, file) = store.open("style").await.unwrap();
    assert_eq!(source.read(&file).await.unwrap(), bytes, "the file as stored");
    let straddle = (FILE_RECORD - 10, FILE_RECORD + 10);
    assert_eq!(source.read_range(&file, straddle.0, straddle.1).await.unwrap(), &bytes[straddle.0 as usize..straddle.1 as usize]);
    assert_eq!(LoraFile::open(&source, &file).await.unwrap().short_hash().await.unwrap(), hash);
    drop(source);

    assert!(store.store("style", "memory:other", &files, "style.safetensors", |_, _| {}).await.is_err_and(|e| e.to_string().contains("already holds")));
    assert_eq!(kind(&store.store("vae", "memory:vae", &files, "vae.safetensors", |_, _| {}).await), "UnsupportedFormat");
    assert_eq!(kind(&store.store("pickle", "memory:pickle", &files, "lora.ckpt", |_, _| {}).await), "UnsupportedFormat");
    assert_eq!(kind(&store.store("../up", "memory:style", &files, "style.safetensors", |_, _| {}).await), "InvalidParameter");
    assert_eq!(store.list().await.unwrap().iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["style"], "refused files store nothing");
    assert_eq!(kind(&store.open("missing").await.map(drop)), "ModelIncomplete");

    damage(store.records(), "style/data/00001.bin").await;
    let (source, file) = store.open("style").await.unwrap();
    let damaged = source.read_range(&file, straddle.0, straddle.1).await;
    assert!(damaged.as_ref().is_err_and(|e| e.kind() == "CorruptWeights" && e.to_string().contains("style/data/00001.bin")), "{:?}", damaged.err());
    drop(source);

    let listed = store.list().await.unwrap();
    assert_eq!(store.delete("style").await.unwrap(), listed[0].stored_bytes);
    assert!(store.list().await.unwrap().is_empty() && store.records().list("").await.unwrap().is_empty());
}

/// Runs a test, natively one at a time (`platform::serial`).
// Natively each test blocks its own thread on this future: the lock only keeps other tests out.
#[allow(clippy::await_holding_lock)]
async fn one_at_a_time(test: impl AsyncFn()) {
    #[cfg(not(target_arch = "wasm32"))]
    let _serial = platform::serial();
    test().await
}

// In the browser, in a dedicated worker as the page runs the store.
async_tests!(
    run_in_dedicated_worker, crate::one_at_a_time;
    download_pack_load_and_generate,
    download_folder_converts_as_the_cli,
    interrupted_pack_download_resumes,
    interrupted_conversion_resumes,
    damaged_records_are_fetched_again,
    a_damaged_record_fails_every_load,
    an_interrupted_pack_update_never_mixes_versions,
    running_out_of_space_leaves_no_model_complete,
    delete_frees_the_space,
    bad_requests_get_clear_errors,
    bad_http_answers_get_clear_errors,
    source_bytes_are_checked_against_stated_hashes,
    loras_are_stored_as_files_and_checked,
);
