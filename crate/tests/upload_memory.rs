//! Uploading a model must not keep a second copy of it: `queue.write_buffer` stages every write
//! until the next submit, so `Gpu` submits (and natively waits) every 256 MiB staged. Measured as
//! this process's peak resident memory while 1 GiB is uploaded in 64 MiB tensors (on lavapipe the
//! GPU buffers themselves are host memory, so 1 GiB of growth is expected; 2 GiB means the staging
//! copies all lived at once). Its own test binary, so that no other test moves the peak.
#![cfg(all(not(target_arch = "wasm32"), target_os = "linux"))]

use sdxl::{Gpu, Precision};

fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn uploads_hold_at_most_one_staging_window() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let chunk: Vec<f32> = (0..16 << 20).map(|i| i as f32).collect();
        let before = peak_resident_bytes();
        let tensors: Vec<_> = (0..16).map(|_| gpu.upload(&chunk, &[chunk.len()]).unwrap()).collect();
        gpu.sync().await.unwrap();
        let growth = peak_resident_bytes().saturating_sub(before);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        eprintln!("uploaded {} tensors (1 GiB): peak resident memory grew by {:.2} GiB", tensors.len(), gib(growth));
        assert!(growth < 3 << 29, "peak grew by {:.2} GiB for 1 GiB of uploads: staging copies are kept", gib(growth));
        let last = gpu.read(&tensors[15]).await.unwrap();
        assert_eq!(last[12345], 12345.0);
    });
}
