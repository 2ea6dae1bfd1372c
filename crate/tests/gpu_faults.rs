//! A real GPU out-of-memory, forced: the process's address space is capped (lavapipe's device
//! memory is host memory, so its allocations fail as a GPU's would when VRAM is full). The failed
//! operation returns the out-of-memory, and the next valid calls work and give the same image.
//! Alone in its binary: the cap holds for the whole process.
#![cfg(target_os = "linux")]

use sdxl::pipeline::generate::{generate, GenerateParams, SdxlModel};
use sdxl::quant::QuantPreset;
use sdxl::weights::{DirSource, ModelSource};
use sdxl::{Error, Gpu, Precision};

/// The process's virtual memory now, from /proc.
fn address_space_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmSize:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap();
    kib * 1024
}

fn cap_address_space(bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0, "setrlimit");
}

async fn image(gpu: &Gpu, model: &SdxlModel) -> Vec<f32> {
    let params = GenerateParams { prompt: "a red fox".into(), width: 64, height: 64, steps: 2, seed: 3, ..GenerateParams::default() };
    gpu.read(&generate(gpu, model, None, &params, |_| {}).await.unwrap().image).await.unwrap()
}

#[test]
fn an_out_of_memory_fails_its_operation_only() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let folder = DirSource::new(format!("{}/../tests/fixtures/tiny-sdxl-base", env!("CARGO_MANIFEST_DIR")));
        let model = SdxlModel::load(&gpu, &ModelSource::folder(folder, false), &QuantPreset::F16.policy()).await.unwrap();
        let before = image(&gpu, &model).await;

        // 64 MiB activations until the device is out of memory (at most 4 GiB: the cap leaves 1 GiB).
        cap_address_space(address_space_bytes() + (1 << 30));
        let exhausted = gpu
            .operation(async {
                let mut held = Vec::new();
                for _ in 0..64 {
                    held.push(gpu.zeros(&[16 << 20])?);
                    gpu.sync().await?;
                }
                Ok(())
            })
            .await;
        cap_address_space(libc::RLIM_INFINITY);
        assert!(matches!(&exhausted, Err(Error::Gpu(m)) if m.contains("out of GPU memory")), "{exhausted:?}");
        assert_eq!(gpu.memory().cached, 0, "the failed operation's buffers were freed");
        assert_eq!(image(&gpu, &model).await, before, "the run after an out-of-memory");
    });
}
