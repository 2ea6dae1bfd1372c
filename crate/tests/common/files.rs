//! Native-only support for the tests that run the `sdxl` binary or write model folders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
