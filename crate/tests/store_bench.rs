//! Store benchmark (not a test; tests/bench_store.sh runs it): download → IndexedDB and
//! IndexedDB → GPU throughput, and the wasm heap, on the synthetic incompressible pack that
//! tests/make_bench_pack.py writes and tests/server.py serves at /bench. Prints one JSON line.
#![cfg(target_arch = "wasm32")]

use sdxl::quant::QuantPreset;
use sdxl::store::{DownloadOptions, IdbStore, ModelStore};
use sdxl::quant::QuantPolicy;
use sdxl::weights::Vars;
use sdxl::{Gpu, Precision};

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_dedicated_worker);

fn heap_bytes() -> u64 {
    core::arch::wasm32::memory_size(0) as u64 * 65536
}

fn mib_per_s(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / 1048576.0 / (ms / 1000.0)
}

#[wasm_bindgen_test::wasm_bindgen_test]
async fn store_bench() {
    let server = option_env!("SDXL_TEST_SERVER").expect("SDXL_TEST_SERVER (tests/bench_store.sh sets it)");
    let store = ModelStore::new(IdbStore::open("sdxl-bench").await.unwrap());
    store.delete_all().await.unwrap();
    let heap_start = heap_bytes();

    let t0 = js_sys::Date::now();
    let manifest = store.download("bench", &format!("{server}/bench"), &DownloadOptions::new(QuantPreset::Q4), |_| {}).await.unwrap();
    let t1 = js_sys::Date::now();
    let heap_after_download = heap_bytes();

    let gpu = Gpu::new(Precision::Auto).await.unwrap();
    let (model, _) = store.open("bench", &|_| {}).await.unwrap();
    let tensors = model.tensors("bench").await.unwrap();
    let policy = QuantPolicy::default();
    let vars = Vars::new(&gpu, &*tensors, "bench", &policy);
    let t2 = js_sys::Date::now();
    for name in tensors.names() {
        let shape = tensors.info(name).unwrap().shape.clone();
        drop(vars.tensor(name, &shape).await.unwrap());
    }
    gpu.sync().await.unwrap();
    let t3 = js_sys::Date::now();

    let bytes = manifest.bytes();
    let report = serde_json::json!({
        "pack_mib": bytes as f64 / 1048576.0,
        "records": manifest.shards.len(),
        "adapter": gpu.adapter_name,
        "gpu_dtype": format!("{:?}", gpu.dtype),
        "download_to_indexeddb_mib_s": mib_per_s(bytes, t1 - t0),
        "indexeddb_to_gpu_mib_s": mib_per_s(bytes, t3 - t2),
        "wasm_heap_mib": { "start": heap_start >> 20, "after_download": heap_after_download >> 20, "peak": heap_bytes() >> 20 },
    });
    wasm_bindgen_test::console_log!("STORE_BENCH {report}");
    store.delete_all().await.unwrap();
}
