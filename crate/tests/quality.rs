//! Quantization quality on the tiny base fixture (issue bar: q8 image PSNR >= 35 dB against dense
//! f32 on the same seed; q4 measured and reported).
#![cfg(not(target_arch = "wasm32"))]

use sdxl::pipeline::generate::GenerateParams;
use sdxl::pipeline::quality::quality;
use sdxl::weights::DirSource;
use sdxl::{Gpu, Precision};

#[test]
fn q8_and_q4_quality_against_dense_f32() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let source = DirSource::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base"));
        let params = GenerateParams {
            prompt: "a red fox in the snow, watercolor".into(),
            negative: Some("blurry".into()),
            width: 96,
            height: 64,
            steps: 5,
            seed: 42,
            ..Default::default()
        };
        let report = quality(&gpu, &source, &params).await.unwrap();
        assert!(report.layers.len() > 50, "every quantizable UNet matrix is measured");
        for l in &report.layers {
            // Q8's error per element is at most half a step of max|x| / 127; Q4's of (max - min) / 15.
            assert!(l.q8 < 0.01 && l.q4 < 0.1 && l.q8 < l.q4, "{}: q8 {:.2e}, q4 {:.2e}", l.name, l.q8, l.q4);
        }
        let [q8, q4] = [&report.presets[0], &report.presets[1]];
        eprintln!("q8: UNet rel. error {:.2e}, PSNR {:.1} dB; q4: {:.2e}, {:.1} dB", q8.unet_relative_error, q8.image_psnr, q4.unet_relative_error, q4.image_psnr);
        assert!(q8.image_psnr >= 35.0, "q8 image PSNR {:.1} dB < 35 dB", q8.image_psnr);
        assert!(q8.unet_relative_error < 0.05, "q8 UNet relative error {:.2e}", q8.unet_relative_error);
        assert!(q4.image_psnr.is_finite() && q4.image_psnr > 20.0, "q4 image PSNR {:.1} dB", q4.image_psnr);
        assert!(q4.unet_matrix_bytes < q8.unet_matrix_bytes, "q4 must be smaller than q8");
    });
}
