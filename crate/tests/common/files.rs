//! Native-only support for the tests that run the `sdxl` binary or write model folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sdxl::pipeline::generate::GenerateParams;
use sdxl::weights::safetensors::{header_len, parse_header, Dtype};
use sdxl::weights::{DirSource, FileTensors};
use serde::Deserialize;

/// Runs the `sdxl` binary built with the tests.
pub fn sdxl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdxl")).args(args).output().expect("the sdxl binary runs")
}

/// A fresh directory under the system temp dir (named after this test binary's process and
/// `name`), deleted on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sdxl-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `from` to `to` recursively, leaving out the top-level entry `skip`.
pub fn copy_tree(from: &Path, to: &Path, skip: &str) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == skip {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target, "");
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every tensor of `dir/file` as (shape, values); each must be stored as F32.
pub fn read_all(dir: &Path, file: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let n = header_len(file, &bytes, bytes.len() as u64).unwrap() as usize;
    let header = parse_header(file, &bytes[8..8 + n], bytes.len() as u64).unwrap();
    let source = DirSource::new(dir);
    let weights = pollster::block_on(FileTensors::open(&source, vec![file.to_string()])).unwrap();
    header
        .tensors
        .into_iter()
        .map(|(name, info)| {
            assert_eq!(info.dtype, Dtype::F32, "{name}: dtype");
            let values = pollster::block_on(weights.host(&name, &info.shape)).unwrap();
            (name, (info.shape, values))
        })
        .collect()
}

/// One whole-pipeline case of tests/fixtures/reference/*pipeline_cases.json (ref_pipeline.py).
#[derive(Deserialize, Debug)]
pub struct Case {
    pub name: String,
    pub prompt: String,
    pub negative: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub refiner_start: Option<f64>,
}

impl Case {
    /// The cases of a JSON file under tests/fixtures/reference.
    pub fn load(file: &str) -> Vec<Case> {
        let path = format!("{}/../tests/fixtures/reference/{file}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))).unwrap()
    }

    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            prompt: self.prompt.clone(),
            negative: self.negative.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            refiner_start: self.refiner_start.unwrap_or(0.8),
            ..Default::default()
        }
    }
}
