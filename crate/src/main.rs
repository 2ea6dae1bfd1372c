//! The `sdxl` binary: see `sdxl::cli`.

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    sdxl::cli::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}
