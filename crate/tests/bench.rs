//! `sdxl bench` as a smoke check at tiny sizes, with no timing assertions: every measurement runs
//! on the tiny fixture's shapes and the report is complete and sane; the activation pool reuses
//! freed buffers; bad options are refused.
#![cfg(not(target_arch = "wasm32"))]

use sdxl::bench::{self, BenchModel, BenchOptions};
use sdxl::quant::QuantPreset;
use sdxl::{Error, Gpu, Precision};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base");

fn tiny() -> BenchModel {
    let read = |file: &str| std::fs::read(format!("{TINY}/{file}")).unwrap();
    BenchModel { name: "tiny".into(), unet_config: read("unet/config.json"), vae_config: read("vae/config.json") }
}

#[test]
fn bench_reports_every_measurement() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::Auto).await.unwrap();
        let options = BenchOptions { sizes: vec![64], quants: vec![QuantPreset::F16, QuantPreset::Q4], lora_ranks: vec![4], ..Default::default() };
        let report = bench::run(&gpu, &tiny(), &options, |_| {}).await.unwrap();
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        assert!(report.peak.gflops > 0.0 && report.peak.gbps > 0.0, "{:?}", report.peak);
        // Two levels with attention (3 GEGLU formats, self- and cross-attention each), 3×3 convs on
        // two levels in 3 formats, GroupNorm+SiLU, the VAE's conv and attention.
        assert_eq!(report.kernels.len(), 2 * 5 + 2 * 3 + 3, "{:?}", report.kernels);
        for k in &report.kernels {
            assert!(k.ms > 0.0 && k.rate > 0.0 && k.percent_of_peak > 0.0, "{k:?}");
        }
        let runs: Vec<_> = report.unet.iter().map(|u| (u.quant.as_str(), u.lora_rank)).collect();
        assert_eq!(runs, [("f16", None), ("f16", Some(4)), ("q4", None), ("q4", Some(4))], "each base alone and with a LoRA");
        for u in &report.unet {
            assert!(u.seconds_per_step > 0.0 && u.weight_bytes > 0 && u.peak_bytes > u.weight_bytes, "{u:?}");
        }
        assert!(report.unet[2].weight_bytes < report.unet[0].weight_bytes, "q4 weights must be smaller than f16");
        // The first step compiles what the kernel suite did not (the time embedding, norms, …);
        // the weight format is a kernel parameter, so q4 runs f16's launches on f16's pipelines.
        assert!(report.unet.iter().all(|u| u.first_step_seconds > 0.0 && u.dispatches_per_step > 0), "{:?}", report.unet);
        assert!(report.unet[0].pipelines_compiled > 0, "{:?}", report.unet[0]);
        assert_eq!(report.unet[0].dispatches_per_step, report.unet[2].dispatches_per_step, "f16 and q4 steps launch the same kernels");
        assert!(report.unet[1].dispatches_per_step > report.unet[0].dispatches_per_step, "a LoRA adds its low-rank products");
        assert_eq!(report.vae.iter().map(|v| v.tiled).collect::<Vec<_>>(), [false, true]);
        assert_eq!(report.taesd.iter().map(|t| t.size).collect::<Vec<_>>(), [64], "one TAESD preview decode per size");
        for t in &report.taesd {
            assert!(t.seconds > 0.0 && t.peak_bytes > 0, "{t:?}");
        }
        let ms = |s: f64| s * 1e3;
        eprintln!("64²: VAE decode {:.3} ms whole, {:.3} ms tiled; TAESD preview decode {:.3} ms", ms(report.vae[0].seconds), ms(report.vae[1].seconds), ms(report.taesd[0].seconds));
        let table = report.table();
        for part in ["linear+geglu", "self-attention", "conv3x3", "s/step", "peak MiB", "first step s", "dispatches", " r4 ", "TAESD preview decode ms"] {
            assert!(table.contains(part), "table lacks {part}:\n{table}");
        }
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert!(json["unet"][0]["secondsPerStep"].as_f64().unwrap() > 0.0);
        assert!(json["unet"][0]["dispatchesPerStep"].as_u64().unwrap() > 0, "{}", json["unet"][0]);
        assert!(json["taesd"][0]["seconds"].as_f64().unwrap() > 0.0, "{}", json["taesd"]);
        assert_eq!(json["taesd"][0]["size"], 64);
    });
}

#[test]
fn pool_reuses_freed_activations() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::Auto).await.unwrap();
        let first = gpu.empty(&[1000, 300]).unwrap();
        let size = first.buffer_bytes();
        let after_first = gpu.memory().allocated;
        drop(first);
        assert_eq!(gpu.memory().cached, size, "a freed activation stays in the pool");
        // A nearby size shares the size class: no new buffer.
        let second = gpu.empty(&[1001, 299]).unwrap();
        assert_eq!(gpu.memory().allocated, after_first);
        assert_eq!(gpu.memory().cached, 0);
        drop(second);
        gpu.trim();
        assert_eq!(gpu.memory().allocated, after_first - size, "trim frees the pool");
        // A weight is freed on drop, not pooled.
        let weight = gpu.upload(&[1.0; 64], &[64]).unwrap();
        drop(weight);
        assert_eq!(gpu.memory().cached, 0);
        // zeros from a recycled buffer are zeros.
        let dirty = gpu.upload(&[7.0; 4096], &[4096]).unwrap();
        let copy = gpu.scale(&dirty, 1.0).unwrap();
        drop(copy);
        let zeros = gpu.zeros(&[4096]).unwrap();
        assert!(gpu.read(&zeros).await.unwrap().iter().all(|&v| v == 0.0));
    });
}

#[test]
fn bad_options_are_refused() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::Auto).await.unwrap();
        let options = BenchOptions { sizes: vec![60], ..Default::default() };
        assert!(matches!(bench::run(&gpu, &tiny(), &options, |_| {}).await, Err(Error::InvalidParameter(_))));
        let broken = BenchModel { name: "broken".into(), unet_config: b"{".to_vec(), vae_config: b"{}".to_vec() };
        assert!(matches!(bench::run(&gpu, &broken, &BenchOptions::default(), |_| {}).await, Err(Error::Config { .. })));
    });
}
