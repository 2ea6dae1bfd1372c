#![cfg(not(target_arch = "wasm32"))]
//! Broken model folders fail with a typed `sdxl::Error` that names the file (and the tensor, where
//! one is at fault), never with a panic. Each case copies the text-encoding parts of the tiny base
//! fixture to a temp dir, breaks one file, and loads the prompt encoder from it as the CLI does.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sdxl::pipeline::prompt::PromptEncoder;
use sdxl::pipeline::ModelIndex;
use sdxl::weights::safetensors::{header_len, parse_header, Dtype, Header};
use sdxl::quant::QuantPolicy;
use sdxl::weights::{DirSource, ModelSource};
use sdxl::{Error, Gpu, Precision, Result};
use serde_json::{json, Map, Value};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base");
/// What prompt encoding reads (the UNet and VAE are not copied).
const PARTS: &[&str] = &["model_index.json", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"];

const TE2_WEIGHTS: &str = "text_encoder_2/model.safetensors";
const TE2_CONFIG: &str = "text_encoder_2/config.json";
/// F16 [24] in the fixture: 48 bytes.
const NORM: &str = "text_model.final_layer_norm.weight";
/// F16 [24, 24] in the fixture.
const Q_PROJ: &str = "text_model.encoder.layers.0.self_attn.q_proj.weight";

/// Asserts that `result` failed with an error matching `pattern` whose message mentions every needle.
macro_rules! assert_error {
    ($result:expr, $pattern:pat $(if $guard:expr)?, [$($needle:expr),+ $(,)?]) => {{
        let err: Error = $result.expect_err("the bad input was accepted");
        assert!(matches!(err, $pattern $(if $guard)?), "wrong error variant: {err:?}");
        let message = err.to_string();
        $( assert!(message.contains(AsRef::<str>::as_ref(&$needle)), "{message:?} does not mention {:?}", $needle); )+
    }};
}

/// A copy of the fixture's text-encoding parts in a fresh temp dir, deleted on drop.
struct Model {
    root: PathBuf,
}

impl Model {
    fn copy() -> Model {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("sdxl-bad-inputs-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let root = std::env::temp_dir().join(name);
        for part in PARTS {
            copy_all(&Path::new(FIXTURE).join(part), &root.join(part));
        }
        Model { root }
    }

    /// The fixture with `file` deleted.
    fn without(file: &str) -> Model {
        let model = Model::copy();
        std::fs::remove_file(model.root.join(file)).unwrap();
        model
    }

    /// The fixture with `file`'s bytes passed through `edit`.
    fn with(file: &str, edit: impl FnOnce(&mut Vec<u8>)) -> Model {
        let model = Model::copy();
        let path = model.root.join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        edit(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
        model
    }

    /// `file` as errors print it.
    fn path(&self, file: &str) -> String {
        self.root.join(file).display().to_string()
    }

    /// Loads the prompt encoder exactly as `sdxl encode` does.
    fn load(&self) -> Result<()> {
        pollster::block_on(async {
            let gpu = Gpu::new(Precision::F32).await.expect("a GPU adapter (lavapipe natively)");
            let model = ModelSource::folder(DirSource::new(&self.root), false);
            let index = ModelIndex::load(&model.files).await?;
            PromptEncoder::load(&gpu, &model, &index, &QuantPolicy::default(), &Default::default()).await.map(drop)
        })
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn copy_all(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_all(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// An edit of a JSON file.
fn json_edit(edit: impl FnOnce(&mut Value)) -> impl FnOnce(&mut Vec<u8>) {
    move |bytes| {
        let mut value = serde_json::from_slice(bytes).unwrap();
        edit(&mut value);
        *bytes = serde_json::to_vec_pretty(&value).unwrap();
    }
}

/// An edit of one tensor's entry in a safetensors header; the data section is kept as it is.
fn tensor_edit(name: &'static str, edit: impl FnOnce(&mut Value)) -> impl FnOnce(&mut Vec<u8>) {
    move |bytes| {
        let end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: Map<String, Value> = serde_json::from_slice(&bytes[8..end]).unwrap();
        edit(header.get_mut(name).expect("a tensor of the fixture"));
        let json = serde_json::to_vec(&header).unwrap();
        *bytes = [&(json.len() as u64).to_le_bytes()[..], &json, &bytes[end..]].concat();
    }
}

// Missing files.

#[test]
fn missing_files() {
    // The file deleted and the path its error names: the text encoder's weights, looked for under
    // several names, by their folder.
    for (file, named) in [("model_index.json", "model_index.json"), (TE2_WEIGHTS, "text_encoder_2"), ("tokenizer/vocab.json", "tokenizer/vocab.json")] {
        let model = Model::without(file);
        let result = model.load();
        assert!(result.is_err(), "loaded without {file}");
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        assert_error!(result, Error::Io { .. }, [model.path(named), name]);
    }
}

// Corrupt safetensors files.

#[test]
fn truncated_weights() {
    let model = Model::with(TE2_WEIGHTS, |bytes| bytes.truncate(bytes.len() / 2));
    assert_error!(model.load(), Error::Safetensors { .. }, [model.path(TE2_WEIGHTS), "truncated"]);
}

#[test]
fn header_length_past_end_of_file() {
    let model = Model::with(TE2_WEIGHTS, |bytes| {
        let too_long = bytes.len() as u64;
        bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    });
    assert_error!(model.load(), Error::Safetensors { .. }, [model.path(TE2_WEIGHTS), "header length"]);
}

#[test]
fn header_not_json() {
    let model = Model::with(TE2_WEIGHTS, |bytes| bytes[8..16].copy_from_slice(b"not json"));
    assert_error!(model.load(), Error::Safetensors { .. }, [model.path(TE2_WEIGHTS), "not valid JSON"]);
}

#[test]
fn data_offsets_past_the_data() {
    let model = Model::with(TE2_WEIGHTS, tensor_edit(NORM, |t| t["data_offsets"] = json!([0, 1u64 << 40])));
    assert_error!(model.load(), Error::Safetensors { .. }, [model.path(TE2_WEIGHTS), NORM, "outside"]);
}

#[test]
fn shape_disagrees_with_byte_count() {
    let model = Model::with(TE2_WEIGHTS, tensor_edit(NORM, |t| t["shape"] = json!([25])));
    assert_error!(model.load(), Error::Safetensors { .. }, [model.path(TE2_WEIGHTS), NORM, "F16 [25] needs 50 bytes", "48"]);
}

#[test]
fn unsupported_dtype() {
    let model = Model::with(TE2_WEIGHTS, tensor_edit(NORM, |t| t["dtype"] = json!("C64")));
    assert_error!(model.load(), Error::Safetensors { .. }, [model.path(TE2_WEIGHTS), NORM, "unsupported dtype C64"]);
}

// Weights that do not match the config.

#[test]
fn config_disagrees_with_weights() {
    let model = Model::with(TE2_CONFIG, json_edit(|c| c["intermediate_size"] = json!(64)));
    let fc1 = "text_model.encoder.layers.0.mlp.fc1.weight";
    assert_error!(model.load(), Error::Tensor { .. }, [model.path(TE2_WEIGHTS), fc1, "[96, 24]", "[64, 24]"]);
}

#[test]
fn tensor_reshaped() {
    let model = Model::with(TE2_WEIGHTS, tensor_edit(Q_PROJ, |t| t["shape"] = json!([12, 48])));
    assert_error!(model.load(), Error::Tensor { .. }, [model.path(TE2_WEIGHTS), Q_PROJ, "[12, 48]", "[24, 24]"]);
}

#[test]
fn unsupported_activation() {
    let model = Model::with(TE2_CONFIG, json_edit(|c| c["hidden_act"] = json!("mish")));
    assert_error!(model.load(), Error::Config { .. }, [model.path(TE2_CONFIG), "hidden_act 'mish'"]);
}

// The safetensors header parser on hand-made bytes.

const FILE: &str = "hand-made.safetensors";

#[test]
fn header_len_checks_the_prefix_against_the_file() {
    assert_eq!(header_len(FILE, &16u64.to_le_bytes(), 24).unwrap(), 16);
    assert_error!(header_len(FILE, &[16, 0, 0], 3), Error::Safetensors { .. }, [FILE, "too short"]);
    assert_error!(header_len(FILE, &17u64.to_le_bytes(), 24), Error::Safetensors { .. }, [FILE, "header length 17"]);
    assert_error!(header_len(FILE, &u64::MAX.to_le_bytes(), 24), Error::Safetensors { .. }, [FILE, "header length"]);
    // Far past the 100 MiB cap, even in a file that large.
    assert_error!(header_len(FILE, &(1u64 << 30).to_le_bytes(), 1 << 40), Error::Safetensors { .. }, [FILE, "header length"]);
}

/// Parses `header` as the JSON of a file with `data_len` bytes of tensor data after it.
fn parse(header: &Value, data_len: u64) -> Result<Header> {
    let json = serde_json::to_vec(header).unwrap();
    parse_header(FILE, &json, 8 + json.len() as u64 + data_len)
}

#[test]
fn parse_header_locates_tensors() {
    let header = json!({
        "__metadata__": { "format": "pt" },
        "a": { "dtype": "F16", "shape": [2, 3], "data_offsets": [4, 16] },
        "b": { "dtype": "I64", "shape": [], "data_offsets": [16, 24] },
    });
    let data_start = 8 + serde_json::to_vec(&header).unwrap().len() as u64;
    let parsed = parse(&header, 24).unwrap();
    assert_eq!(parsed.tensors.keys().collect::<Vec<_>>(), ["a", "b"]);
    let a = &parsed.tensors["a"];
    assert_eq!((a.dtype, a.shape.as_slice(), a.start, a.end), (Dtype::F16, &[2, 3][..], data_start + 4, data_start + 16));
    let b = &parsed.tensors["b"];
    assert_eq!((b.dtype, b.shape.as_slice(), b.start, b.end), (Dtype::I64, &[][..], data_start + 16, data_start + 24));
}

#[test]
fn parse_header_rejects_malformed_tensors() {
    let cases = [
        (json!({ "shape": [1], "data_offsets": [0, 4] }), "no dtype"),
        (json!({ "dtype": "C64", "shape": [1], "data_offsets": [0, 8] }), "unsupported dtype C64"),
        (json!({ "dtype": "F32", "shape": [-1], "data_offsets": [0, 4] }), "shape is not a list of at most 8 sizes"),
        (json!({ "dtype": "F32", "shape": 4, "data_offsets": [0, 4] }), "shape is not a list of at most 8 sizes"),
        (json!({ "dtype": "F32", "data_offsets": [0, 4] }), "shape is not a list of sizes"),
        // Refused at the ninth dim, before a long list is read (16M dims took 608 MiB).
        (json!({ "dtype": "F32", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1], "data_offsets": [0, 4] }), "more than 8 entries"),
        (json!({ "dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8] }), "data_offsets is not a pair"),
        (json!({ "dtype": "F32", "shape": [1], "data_offsets": [8, 4] }), "outside the 16-byte data section"),
        (json!({ "dtype": "F32", "shape": [1], "data_offsets": [16, 20] }), "outside the 16-byte data section"),
        (json!({ "dtype": "F32", "shape": [2], "data_offsets": [0, 4] }), "F32 [2] needs 8 bytes but the file gives 4"),
        (json!({ "dtype": "F32", "shape": [1u64 << 40, 1u64 << 40], "data_offsets": [0, 4] }), "needs more than 2^64 bytes"),
        // No bytes, but rows of 2^80 values: products of its dims would overflow.
        (json!({ "dtype": "F32", "shape": [0, 1u64 << 40, 1u64 << 40], "data_offsets": [0, 0] }), "more values than this platform addresses"),
    ];
    for (entry, needle) in cases {
        assert_error!(parse(&json!({ "t": entry }), 16), Error::Safetensors { ref message, .. } if message.contains("tensor 't'"), [FILE, needle]);
    }
}

#[test]
fn parse_header_rejects_non_headers() {
    assert_error!(parse_header(FILE, b"not json", 100), Error::Safetensors { .. }, [FILE, "not valid JSON"]);
    assert_error!(parse(&json!([1, 2]), 0), Error::Safetensors { .. }, [FILE, "expected a JSON object"]);
    // A name given twice (a JSON map would keep the last one silently).
    let twice = br#"{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "t": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}"#;
    assert_error!(parse_header(FILE, twice, 8 + twice.len() as u64 + 2), Error::Safetensors { .. }, [FILE, "tensor 't' appears twice"]);
    // A header longer than the file it claims to come from.
    assert_error!(parse_header(FILE, b"{}", 4), Error::Safetensors { .. }, [FILE, "4-byte file"]);
}
