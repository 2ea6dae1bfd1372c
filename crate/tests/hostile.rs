#![cfg(not(target_arch = "wasm32"))]
//! Hostile inputs for every byte parser: safetensors headers, GGUF headers, single-file
//! checkpoints (name mapping and config inference), pack manifests, PNG init images, the
//! tokenizer, weighted prompts and HTTP answers to range reads. Each family tries random bytes and structured mutations of a
//! valid input (so that the parser is reached past its magic), from a fixed seed. Every case must
//! end without a panic, in a typed result, within [`CASE_SECONDS`], and grow this thread's heap
//! by at most [`MEMORY_PER_BYTE`] × its input + [`MEMORY_SLACK`] (a counting allocator below).
//! The headers' parsers also take linear time: four times the tensors, about four times the time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use sdxl::models::clip::ClipTextConfig;
use sdxl::models::unet::UNet2DConditionConfig;
use sdxl::pack::{Manifest, ModelKind, Pack, PackFile, PackTensor, Segment, Shard, Storage, MANIFEST};
use sdxl::pipeline::image::{decode_mask_png, decode_png, encode_png};
use sdxl::pipeline::lpw::{parse_prompt_attention, WeightedTokens};
use sdxl::store::HttpSource;
use sdxl::quant::QuantPreset;
use sdxl::tokenizer::ClipTokenizer;
use sdxl::weights::gguf::{self, GgmlType, Parsed};
use sdxl::weights::names::{sgm_unet_module, Kind, Layout as NameLayout};
use sdxl::weights::names::Entry;
use sdxl::weights::{host_f32, infer, safetensors, DirSource, FileTensors, MemorySource, ModelSource, SharedSource, Source};
use sdxl::{Error, Result};
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
/// Seconds one case may take (debug build, busy 2-core machine): parsing is milliseconds.
const CASE_SECONDS: f64 = 5.0;
/// Heap growth allowed per byte of input, plus a constant.
const MEMORY_PER_BYTE: usize = 64;
const MEMORY_SLACK: usize = 1 << 20;

// ---- A counting allocator: bytes live and their peak, per thread (tests run in parallel).

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + delta);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, size) };
        if !q.is_null() {
            count(size as isize - layout.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `parse` on a hostile input of `input_bytes` (as `what` describes it) and checks the
/// bounds: time, and the peak heap growth (what it returns included, until it is dropped).
fn bounded<T>(what: &str, input_bytes: usize, parse: impl FnOnce() -> T) -> T {
    bounded_by(what, parse, || input_bytes)
}

/// [`bounded`] for an input whose size is known once it has been parsed (bytes read from a source).
fn bounded_by<T>(what: &str, parse: impl FnOnce() -> T, input_bytes: impl FnOnce() -> usize) -> T {
    let start = Instant::now();
    let (out, grown) = peak_growth(parse);
    let seconds = start.elapsed().as_secs_f64();
    let input_bytes = input_bytes();
    let limit = MEMORY_PER_BYTE * input_bytes + MEMORY_SLACK;
    assert!(seconds < CASE_SECONDS, "{what}: {seconds:.2} s");
    assert!(grown <= limit, "{what}: heap grew {grown} bytes for {input_bytes} bytes of input (limit {limit})");
    out
}

/// What `f` returns, and how far it grew this thread's heap at its peak.
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let out = f();
    (out, (PEAK.with(Cell::get) - before).max(0) as usize)
}

/// An error is one of the typed ones a parser gives for bad input (never a GPU or store error).
fn typed<T>(what: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(Error::Safetensors { .. } | Error::Gguf { .. } | Error::Tensor { .. } | Error::WrongModel { .. } | Error::Config { .. }) => None,
        Err(Error::Unsupported { .. } | Error::InvalidParameter(_) | Error::Tokenizer { .. } | Error::Io { .. }) => None,
        Err(e) => panic!("{what}: unexpected error kind {e:?}"),
    }
}

fn runner(cases: u32, seed: u64) -> TestRunner {
    TestRunner::new(Config { cases, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, max_shrink_iters: 256, ..Config::default() })
}

/// Held shared by the case families and alone by the timing tests, so that timings are not
/// taken while other tests of this binary run.
static TIMING: RwLock<()> = RwLock::new(());

/// Runs `cases` cases of `strategy` through `test`, panicking with the (shrunk) failing input.
fn run<S: Strategy>(cases: u32, seed: u64, strategy: S, test: impl Fn(S::Value)) {
    let _shared = TIMING.read().unwrap_or_else(|e| e.into_inner());
    runner(cases, seed)
        .run(&strategy, |value| {
            test(value);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Values that break arithmetic: zero, one, powers of two around 32 and 64 bits, the extremes.
fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(3),
        Just(32),
        Just(255),
        Just(1 << 16),
        Just((1 << 31) - 1),
        Just(1 << 32),
        Just((1 << 32) + 1),
        Just(1 << 40),
        Just(1 << 62),
        Just(1 << 63),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        0u64..4096,
    ]
}

// ---- safetensors headers.

const ST: &str = "hostile.safetensors";

/// A valid header: tensors of every dtype and rank, contiguous, and `__metadata__`.
fn valid_safetensors_header() -> (serde_json::Map<String, Value>, u64) {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt", "note": "hostile" }));
    let tensors: [(&str, &str, &[u64]); 6] =
        [("a.weight", "F16", &[4, 8]), ("b.bias", "F32", &[8]), ("c", "BF16", &[2, 3, 1, 1]), ("d", "I64", &[]), ("e", "F8_E4M3", &[16]), ("f", "U8", &[0, 5])];
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let size = [("F16", 2), ("F32", 4), ("BF16", 2), ("I64", 8), ("F8_E4M3", 1), ("U8", 1)].iter().find(|(d, _)| *d == dtype).unwrap().1;
        let end = offset + size * shape.iter().product::<u64>();
        map.insert(name.into(), json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    (map, offset)
}

/// A mutation of one field of one tensor entry (or of the whole header's text).
#[derive(Debug, Clone)]
enum StMutation {
    Shape(Vec<u64>),
    ManyDims(usize),
    ShapeValue(Value),
    Dtype(Value),
    Offsets(Value),
    Drop(&'static str),
    Metadata(Value),
    Duplicate,
    Entry(Value),
}

fn st_mutation() -> impl Strategy<Value = StMutation> {
    let json_value = prop_oneof![
        Just(Value::Null),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!("F32")),
        Just(json!([])),
        Just(json!({})),
        Just(json!([[1]])),
        Just(json!([1, 2, 3])),
        Just(json!(1e300)),
        Just(json!("x".repeat(300))),
        hostile_u64().prop_map(|n| json!(n)),
    ];
    prop_oneof![
        proptest::collection::vec(hostile_u64(), 0..10).prop_map(StMutation::Shape),
        (9usize..20_000).prop_map(StMutation::ManyDims),
        json_value.clone().prop_map(StMutation::ShapeValue),
        prop_oneof![Just(json!("C64")), Just(json!("f32")), Just(json!("")), json_value.clone()].prop_map(StMutation::Dtype),
        prop_oneof![
            (hostile_u64(), hostile_u64()).prop_map(|(a, b)| json!([a, b])),
            proptest::collection::vec(hostile_u64(), 0..5).prop_map(|v| json!(v)),
            json_value.clone(),
        ]
        .prop_map(StMutation::Offsets),
        prop_oneof![Just("dtype"), Just("shape"), Just("data_offsets")].prop_map(StMutation::Drop),
        prop_oneof![json_value.clone(), Just(json!({ "a": [1, {"b": null}], "c": "d" }))].prop_map(StMutation::Metadata),
        Just(StMutation::Duplicate),
        json_value.prop_map(StMutation::Entry),
    ]
}

/// The header text and data length after `mutations` (tensor index, mutation), then a cut or a
/// flipped byte of the text.
fn mutated_safetensors(mutations: &[(usize, StMutation)], cut: Option<usize>, flip: Option<(usize, u8)>, data_cut: u64) -> (Vec<u8>, u64) {
    let (mut map, data_len) = valid_safetensors_header();
    let mut duplicate = None;
    for (i, m) in mutations {
        let names: Vec<String> = map.keys().filter(|k| *k != "__metadata__").cloned().collect();
        let name = &names[i % names.len()];
        let entry = map.get_mut(name).unwrap();
        let mut set = |field: &str, value: Value| drop(entry.as_object_mut().map(|o| o.insert(field.into(), value)));
        match m.clone() {
            StMutation::Shape(s) => set("shape", json!(s)),
            StMutation::ManyDims(n) => set("shape", json!(vec![1; n])),
            StMutation::ShapeValue(v) => set("shape", v),
            StMutation::Dtype(v) => set("dtype", v),
            StMutation::Offsets(v) => set("data_offsets", v),
            StMutation::Drop(field) => drop(entry.as_object_mut().map(|o| o.remove(field))),
            StMutation::Metadata(v) => drop(map.insert("__metadata__".into(), v)),
            StMutation::Duplicate => duplicate = Some((name.clone(), entry.clone())),
            StMutation::Entry(v) => *entry = v,
        }
    }
    let mut text = serde_json::to_vec(&map).unwrap();
    // A second entry of the same name, written into the text (a JSON map cannot hold it).
    if let Some((name, entry)) = duplicate {
        let extra = format!(",{}:{}}}", json!(name), entry);
        text.pop();
        text.extend(extra.bytes());
    }
    if let Some((at, byte)) = flip {
        let at = at % text.len();
        text[at] = byte;
    }
    if let Some(cut) = cut {
        text.truncate(cut % (text.len() + 1));
    }
    (text, data_len.saturating_sub(data_cut))
}

fn parse_safetensors(what: &str, file: &[u8], file_len: u64) {
    let header = bounded(what, file.len(), || {
        let n = safetensors::header_len(ST, file, file_len)?;
        let json = file.get(8..8 + n as usize).unwrap_or(&file[file.len().min(8)..]);
        safetensors::parse_header(ST, json, file_len)
    });
    if let Some(header) = typed(what, header) {
        for t in header.tensors.values() {
            assert!(t.start <= t.end && t.end <= file_len, "{what}: accepted a range outside the file");
        }
    }
}

#[test]
fn safetensors_random_bytes() {
    run(256, 1, proptest::collection::vec(any::<u8>(), 0..512), |bytes| parse_safetensors("random bytes", &bytes, bytes.len() as u64));
}

/// JSON-looking text: the parser gets past JSON syntax into entries and fields.
#[test]
fn safetensors_token_soup() {
    let token = prop_oneof![
        Just("{"), Just("}"), Just("["), Just("]"), Just(":"), Just(","), Just("\"dtype\""), Just("\"shape\""), Just("\"data_offsets\""),
        Just("\"F32\""), Just("\"F16\""), Just("\"__metadata__\""), Just("\"t\""), Just("0"), Just("4"), Just("-1"), Just("1e400"),
        Just("18446744073709551615"), Just("18446744073709551616"), Just("null"), Just("true"), Just("\"\\u0000\""), Just(" "),
    ];
    run(256, 2, proptest::collection::vec(token, 0..64), |tokens| {
        let json = tokens.concat().into_bytes();
        let file = [&(json.len() as u64).to_le_bytes()[..], &json, &[0u8; 64]].concat();
        parse_safetensors("token soup", &file, file.len() as u64);
    });
}

/// A valid header with fields mutated: huge, many and overflowing dims, wrong dtypes and
/// offsets, duplicated names, a truncated or altered text, a truncated data section.
#[test]
fn safetensors_mutated_headers() {
    let strategy = (
        proptest::collection::vec((0usize..8, st_mutation()), 1..4),
        proptest::option::weighted(0.2, any::<usize>()),
        proptest::option::weighted(0.2, (any::<usize>(), any::<u8>())),
        prop_oneof![Just(0u64), 0u64..64],
    );
    run(512, 3, strategy, |(mutations, cut, flip, data_cut)| {
        let (json, data_len) = mutated_safetensors(&mutations, cut, flip, data_cut);
        let file = [&(json.len() as u64).to_le_bytes()[..], &json].concat();
        parse_safetensors(&format!("{mutations:?}"), &file, file.len() as u64 + data_len);
    });
    // The valid header itself parses, and a duplicated name is refused by name.
    let (json, data_len) = mutated_safetensors(&[], None, None, 0);
    assert_eq!(safetensors::parse_header(ST, &json, 8 + json.len() as u64 + data_len).unwrap().tensors.len(), 6);
    let (json, data_len) = mutated_safetensors(&[(0, StMutation::Duplicate)], None, None, 0);
    let err = safetensors::parse_header(ST, &json, 8 + json.len() as u64 + data_len).unwrap_err();
    assert!(err.to_string().contains("tensor 'a.weight' appears twice"), "{err}");
}

/// A shape of 16M dims once took 608 MiB to parse: shapes are refused past 8 dims as they are
/// read, so the header's memory stays a small multiple of its text.
#[test]
fn safetensors_many_dims_stay_bounded() {
    let (json, data_len) = mutated_safetensors(&[(0, StMutation::ManyDims(4 << 20))], None, None, 0);
    let file_len = 8 + json.len() as u64 + data_len;
    let (result, grown) = peak_growth(|| safetensors::parse_header(ST, &json, file_len));
    let err = result.unwrap_err();
    assert!(matches!(&err, Error::Safetensors { message, .. } if message.contains("'a.weight'") && message.contains("at most 8")), "{err}");
    // Refused at the ninth dim: nothing grows with the list (it grew by 189 MiB here).
    assert!(grown < 64 << 10, "{} bytes of header grew the heap by {grown}", json.len());
}

// ---- GGUF headers.

/// A GGUF file written field by field, so that any field can hold any value.
#[derive(Debug, Clone)]
struct RawGguf {
    version: u32,
    /// Overrides the counts written (None: the true ones).
    tensor_count: Option<u64>,
    metadata_count: Option<u64>,
    /// (key, value type, value bytes).
    metadata: Vec<(Vec<u8>, u32, Vec<u8>)>,
    tensors: Vec<RawInfo>,
    /// Bytes of data after the header's padding.
    data: u64,
}

#[derive(Debug, Clone)]
struct RawInfo {
    name: Vec<u8>,
    /// ggml order (ne[0] innermost).
    ne: Vec<u64>,
    type_id: u32,
    offset: u64,
}

impl RawGguf {
    /// A valid file: tensors of float, 32-value and K-quant types, 1-D to 4-D, and metadata of
    /// every value type (an array of arrays included).
    fn valid() -> RawGguf {
        let string = |s: &str| [&(s.len() as u64).to_le_bytes()[..], s.as_bytes()].concat();
        let array = |item: u32, n: u64, items: &[u8]| [&item.to_le_bytes()[..], &n.to_le_bytes(), items].concat();
        let metadata = vec![
            (b"general.architecture".to_vec(), 8, string("sdxl")),
            (b"general.alignment".to_vec(), 4, 32u32.to_le_bytes().to_vec()),
            (b"u8".to_vec(), 0, vec![7]),
            (b"flag".to_vec(), 7, vec![1]),
            (b"f64".to_vec(), 12, 0.5f64.to_le_bytes().to_vec()),
            (b"list".to_vec(), 9, array(5, 2, &[1, 0, 0, 0, 2, 0, 0, 0])),
            (b"nested".to_vec(), 9, array(9, 1, &array(8, 1, &string("x")))),
        ];
        let types = [(GgmlType::F32, vec![8u64, 2]), (GgmlType::F16, vec![4]), (GgmlType::Q8_0, vec![32]), (GgmlType::Q4_1, vec![64, 2]), (GgmlType::Q5_0, vec![32, 1, 1, 2]), (GgmlType::Q4_K, vec![256, 2]), (GgmlType::Q6_K, vec![256])];
        let mut tensors = Vec::new();
        let mut offset = 0u64;
        for (i, (t, ne)) in types.into_iter().enumerate() {
            let bytes = ne.iter().product::<u64>() / t.block_values() as u64 * t.block_bytes() as u64;
            tensors.push(RawInfo { name: format!("t{i}.weight").into_bytes(), ne, type_id: t.id(), offset });
            offset = (offset + bytes).next_multiple_of(32);
        }
        RawGguf { version: 3, tensor_count: None, metadata_count: None, metadata, tensors, data: offset }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.tensor_count.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        out.extend(self.metadata_count.unwrap_or(self.metadata.len() as u64).to_le_bytes());
        for (key, type_id, value) in &self.metadata {
            out.extend((key.len() as u64).to_le_bytes());
            out.extend(key);
            out.extend(type_id.to_le_bytes());
            out.extend(value);
        }
        for t in &self.tensors {
            out.extend((t.name.len() as u64).to_le_bytes());
            out.extend(&t.name);
            out.extend((t.ne.len() as u32).to_le_bytes());
            t.ne.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.type_id.to_le_bytes());
            out.extend(t.offset.to_le_bytes());
        }
        out.resize(out.len().next_multiple_of(32), 0);
        out.resize(out.len() + self.data.min(4 << 20) as usize, 0x3c);
        out
    }
}

#[derive(Debug, Clone)]
enum GgufMutation {
    Version(u32),
    TensorCount(u64),
    MetadataCount(u64),
    Dims(Vec<u64>),
    Type(u32),
    Offset(u64),
    Name(Vec<u8>),
    DuplicateName,
    MetadataType(u32),
    MetadataValue(Vec<u8>),
    ArrayLength(u64),
    Alignment(u64),
    Data(u64),
}

fn gguf_mutation() -> impl Strategy<Value = GgufMutation> {
    prop_oneof![
        prop_oneof![Just(1u32), Just(2), Just(3), Just(3u32.swap_bytes()), any::<u32>()].prop_map(GgufMutation::Version),
        hostile_u64().prop_map(GgufMutation::TensorCount),
        hostile_u64().prop_map(GgufMutation::MetadataCount),
        proptest::collection::vec(hostile_u64(), 0..7).prop_map(GgufMutation::Dims),
        prop_oneof![0u32..42, any::<u32>()].prop_map(GgufMutation::Type),
        hostile_u64().prop_map(GgufMutation::Offset),
        prop_oneof![Just(vec![]), Just(vec![0xff, 0xfe]), proptest::collection::vec(any::<u8>(), 0..40)].prop_map(GgufMutation::Name),
        Just(GgufMutation::DuplicateName),
        prop_oneof![0u32..14, any::<u32>()].prop_map(GgufMutation::MetadataType),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(GgufMutation::MetadataValue),
        hostile_u64().prop_map(GgufMutation::ArrayLength),
        hostile_u64().prop_map(GgufMutation::Alignment),
        hostile_u64().prop_map(GgufMutation::Data),
    ]
}

fn mutated_gguf(mutations: &[(usize, GgufMutation)]) -> RawGguf {
    let mut g = RawGguf::valid();
    for (i, m) in mutations {
        let t = i % g.tensors.len();
        let k = i % g.metadata.len();
        match m.clone() {
            GgufMutation::Version(v) => g.version = v,
            GgufMutation::TensorCount(n) => g.tensor_count = Some(n),
            GgufMutation::MetadataCount(n) => g.metadata_count = Some(n),
            GgufMutation::Dims(ne) => g.tensors[t].ne = ne,
            GgufMutation::Type(id) => g.tensors[t].type_id = id,
            GgufMutation::Offset(o) => g.tensors[t].offset = o,
            GgufMutation::Name(name) => g.tensors[t].name = name,
            GgufMutation::DuplicateName => g.tensors[t].name = g.tensors[(t + 1) % g.tensors.len()].name.clone(),
            GgufMutation::MetadataType(id) => g.metadata[k].1 = id,
            GgufMutation::MetadataValue(v) => g.metadata[k].2 = v,
            GgufMutation::ArrayLength(n) => {
                if let Some(length) = g.metadata[5].2.get_mut(4..12) {
                    length.copy_from_slice(&n.to_le_bytes());
                }
            }
            GgufMutation::Alignment(a) => g.metadata[1] = (b"general.alignment".to_vec(), 10, a.to_le_bytes().to_vec()),
            GgufMutation::Data(d) => g.data = d,
        }
    }
    g
}

/// Parses `file` (a `file_len`-byte file's first bytes) and reads every tensor it accepts, as
/// the models do: all its values, dequantized.
fn parse_gguf(what: &str, file: &[u8], file_len: u64) {
    let header = bounded(what, file.len(), || gguf::parse_header("hostile.gguf", file, file_len));
    let Some(Parsed::Header(header)) = typed(what, header) else { return };
    let mut source = MemorySource::default();
    source.insert("hostile.gguf", file.to_vec());
    let entries = header.tensors.iter().cloned().map(|t| Entry::gguf(0, t));
    let tensors = FileTensors::new(SharedSource::new(source), vec!["hostile.gguf".into()], entries);
    for t in &header.tensors {
        assert!(t.start <= t.end && t.end <= file_len, "{what}: tensor '{}' accepted outside the file", t.name);
        if t.end > file.len() as u64 {
            continue; // a prefix of a longer file
        }
        let values = bounded(what, file.len(), || pollster::block_on(tensors.host(&t.name, &t.shape)));
        if let Some(values) = typed(what, values) {
            assert_eq!(values.len(), t.elements(), "{what}: tensor '{}' {:?} {:?}", t.name, t.ggml_type, t.shape);
        }
    }
}

#[test]
fn gguf_random_bytes() {
    run(256, 4, proptest::collection::vec(any::<u8>(), 0..512), |bytes| parse_gguf("random bytes", &bytes, bytes.len() as u64));
    // Past the magic and version: random counts and fields.
    run(256, 5, proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
        let file = [&b"GGUF"[..], &3u32.to_le_bytes(), &bytes].concat();
        parse_gguf("random header", &file, file.len() as u64);
    });
}

/// A valid file with fields mutated: counts, dims, types, offsets, names (duplicates, not
/// UTF-8), metadata types, values and array lengths, the alignment, the data's length; also
/// cut short and given as a prefix of a longer file.
#[test]
fn gguf_mutated_headers() {
    let strategy = (proptest::collection::vec((0usize..16, gguf_mutation()), 1..4), proptest::option::weighted(0.2, any::<usize>()), hostile_u64());
    run(512, 6, strategy, |(mutations, cut, extra)| {
        let mut file = mutated_gguf(&mutations).bytes();
        if let Some(cut) = cut {
            file.truncate(cut % (file.len() + 1));
        }
        let what = format!("{mutations:?}");
        parse_gguf(&what, &file, file.len() as u64);
        parse_gguf(&what, &file, (file.len() as u64).saturating_add(extra));
    });
    let file = RawGguf::valid().bytes();
    let Ok(Parsed::Header(header)) = gguf::parse_header("valid.gguf", &file, file.len() as u64) else { panic!("the valid file parses") };
    assert_eq!(header.tensors.len(), 7);
}

// ---- Single-file checkpoints: name mapping (names.rs) and config inference (infer.rs).

/// A file of which only the first bytes are stored (the header): the rest reads as zeros, as
/// much as asked for, and is counted as input.
struct Sparse {
    prefix: Vec<u8>,
    len: u64,
    served: Cell<u64>,
}

impl Source for Sparse {
    fn describe(&self, path: &str) -> String {
        format!("sparse:{path}")
    }
    async fn exists(&self, path: &str) -> bool {
        path == "model"
    }
    async fn len(&self, _: &str) -> Result<u64> {
        Ok(self.len)
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        if start > end || end > self.len {
            return Err(Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} of {}", self.len) });
        }
        self.served.set(self.served.get() + (end - start));
        let n = usize::try_from(end - start).unwrap();
        let mut out = vec![0; n];
        let stored = self.prefix.get(start.min(self.prefix.len() as u64) as usize..end.min(self.prefix.len() as u64) as usize).unwrap_or(&[]);
        out[..stored.len()].copy_from_slice(stored);
        Ok(out)
    }
}

/// The tensors (name, dtype or ggml type, shape) of a fixture's single-file checkpoint.
fn fixture_tensors(file: &str) -> &'static [(String, String, Vec<u64>)] {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<String, &'static [(String, String, Vec<u64>)]>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    cache.entry(file.to_string()).or_insert_with(|| {
        let bytes = std::fs::read(format!("{FIXTURES}/single-file/{file}")).unwrap();
        let tensors: Vec<_> = if file.ends_with(".gguf") {
            let Ok(Parsed::Header(header)) = gguf::parse_header(file, &bytes, bytes.len() as u64) else { panic!("{file} parses") };
            header.tensors.into_iter().map(|t| (t.name, t.ggml_type.name().to_string(), t.shape.iter().map(|&d| d as u64).collect())).collect()
        } else {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let entries = header.into_iter().filter(|(name, _)| name != "__metadata__");
            entries.map(|(name, e)| (name, e["dtype"].as_str().unwrap().to_string(), serde_json::from_value(e["shape"].clone()).unwrap())).collect()
        };
        Vec::leak(tensors)
    })
}

/// A single file of `tensors` (safetensors, or GGUF when `gguf`), stored as its header only.
fn sparse_file(tensors: &[(String, String, Vec<u64>)], gguf: bool) -> Sparse {
    if gguf {
        let mut offset = 0u64;
        let infos = tensors.iter().map(|(name, kind, shape)| {
            let t: GgmlType = kind.parse().unwrap_or(GgmlType::F16);
            let values = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).unwrap_or(0);
            let info = RawInfo { name: name.clone().into_bytes(), ne: shape.iter().rev().copied().collect(), type_id: t.id(), offset };
            offset = offset.saturating_add(values / t.block_values() as u64 * t.block_bytes() as u64).next_multiple_of(32);
            info
        });
        let raw = RawGguf { version: 3, tensor_count: None, metadata_count: None, metadata: Vec::new(), tensors: infos.collect(), data: 0 };
        let prefix = raw.bytes();
        return Sparse { len: (prefix.len() as u64).saturating_add(offset), prefix, served: Cell::new(0) };
    }
    let mut map = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let size = if dtype == "F32" || dtype == "I32" { 4 } else if dtype == "I64" { 8 } else { 2 };
        let bytes = shape.iter().try_fold(size, |n: u64, &d| n.checked_mul(d)).unwrap_or(0);
        let end = offset.saturating_add(bytes);
        map.insert(name.clone(), json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let json = serde_json::to_vec(&map).unwrap();
    let prefix = [&(json.len() as u64).to_le_bytes()[..], &json].concat();
    let len = (prefix.len() as u64).saturating_add(offset);
    Sparse { prefix, len, served: Cell::new(0) }
}

/// Names as SGM and stable-diffusion.cpp write them, with block indices to fill in.
const SGM_NAMES: [&str; 16] = [
    "model.diffusion_model.input_blocks.{}.0.out_layers.3.weight",
    "model.diffusion_model.input_blocks.{}.1.transformer_blocks.{}.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.{}.0.op.weight",
    "model.diffusion_model.output_blocks.{}.{}.conv.weight",
    "model.diffusion_model.output_blocks.{}.1.transformer_blocks.{}.attn1.to_q.weight",
    "model.diffusion_model.middle_block.{}.in_layers.0.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.{}.ff.net.2.weight",
    "model.diffusion_model.label_emb.0.{}.weight",
    "first_stage_model.decoder.up.{}.block.{}.conv1.weight",
    "first_stage_model.encoder.down.{}.block.{}.conv2.weight",
    "first_stage_model.decoder.mid.block_{}.norm1.weight",
    "first_stage_model.encoder.mid.attn_1.{}.weight",
    "conditioner.embedders.1.model.transformer.resblocks.{}.attn.in_proj_weight",
    "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.{}.mlp.fc1.weight",
    "cond_stage_model.1.transformer.text_model.encoder.layers.{}.self_attn.in_proj.weight",
];

fn hostile_index() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..12).prop_map(|i| i.to_string()),
        Just("4294967296".into()),
        Just("18446744073709551615".into()),
        Just("18446744073709551616".into()),
        Just("-1".into()),
        Just("".into()),
        Just("x".into()),
        Just("007".into()),
    ]
}

fn hostile_shape() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        Just(vec![]),
        Just(vec![0]),
        Just(vec![1]),
        Just(vec![7]),
        Just(vec![3, 0]),
        Just(vec![64, 0, 3, 3]),
        Just(vec![1 << 20]),
        Just(vec![1, 1 << 20]),
        Just(vec![1 << 24, 64]),
        Just(vec![3, 1, 1, 1, 1]),
        proptest::collection::vec(0u64..300, 0..5),
    ]
}

#[derive(Debug, Clone)]
enum NameMutation {
    /// Replace a number in a tensor's name.
    Index(usize, String),
    Remove(usize),
    Reshape(usize, Vec<u64>),
    /// Keep all dims but one, or add one, or triple the first.
    Warp(usize, u8),
    Add(usize, String, String, Vec<u64>),
}

fn name_mutation() -> impl Strategy<Value = NameMutation> {
    prop_oneof![
        (any::<usize>(), hostile_index()).prop_map(|(i, s)| NameMutation::Index(i, s)),
        any::<usize>().prop_map(NameMutation::Remove),
        (any::<usize>(), hostile_shape()).prop_map(|(i, s)| NameMutation::Reshape(i, s)),
        (any::<usize>(), 0u8..4).prop_map(|(i, w)| NameMutation::Warp(i, w)),
        (0usize..SGM_NAMES.len(), hostile_index(), hostile_index(), hostile_shape()).prop_map(|(t, a, b, s)| NameMutation::Add(t, a, b, s)),
    ]
}

fn mutate_names(tensors: &mut Vec<(String, String, Vec<u64>)>, m: &NameMutation) {
    let n = tensors.len();
    match m {
        NameMutation::Index(i, s) => {
            let name = &mut tensors[i % n].0;
            let parts: Vec<&str> = name.split('.').collect();
            if let Some(p) = parts.iter().position(|p| p.parse::<u64>().is_ok()) {
                let mut parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
                parts[p] = s.clone();
                *name = parts.join(".");
            }
        }
        NameMutation::Remove(i) => drop(tensors.remove(i % n)),
        NameMutation::Reshape(i, s) => tensors[i % n].2 = s.clone(),
        NameMutation::Warp(i, w) => {
            let shape = &mut tensors[i % n].2;
            match w {
                0 => drop(shape.pop()),
                1 => shape.push(1),
                2 => shape.iter_mut().take(1).for_each(|d| *d *= 3),
                _ => shape.reverse(),
            }
        }
        NameMutation::Add(t, a, b, s) => {
            let name = SGM_NAMES[*t].replacen("{}", a, 1).replacen("{}", b, 1);
            tensors.push((name, "F16".into(), s.clone()));
        }
    }
}

/// The single-file fixtures: the safetensors ones with their diffusers folders' configs, the
/// GGUF one with configs inferred from its tensors.
const SINGLE_FILES: [(&str, Option<&str>); 3] =
    [("tiny-sdxl-base.safetensors", Some("tiny-sdxl-base")), ("tiny-sdxl-refiner.safetensors", Some("tiny-sdxl-refiner")), ("tiny-sdxl-std.gguf", None)];

/// Loads `file` as a single-file checkpoint (configs from `FIXTURES/config`, or inferred), then
/// checks its UNet's and text encoders' configs and reads the small tensors of its text encoders.
async fn single_file(what: &str, file: &Sparse, config: Option<&str>) -> Result<()> {
    let config = config.map(|c| SharedSource::new(DirSource::new(format!("{FIXTURES}/{c}"))));
    let model = ModelSource::single_file(file, "model", config).await?;
    let (unet, _) = model.component::<UNet2DConditionConfig>("unet").await?;
    unet.layout().map_err(|message| Error::Config { path: "unet".into(), message })?;
    for encoder in ["text_encoder", "text_encoder_2"] {
        let Ok((config, tensors)) = model.component::<ClipTextConfig>(encoder).await else { continue };
        config.check().map_err(|message| Error::Config { path: encoder.into(), message })?;
        for name in tensors.names() {
            let shape = tensors.info(name).unwrap().shape.clone();
            if shape.iter().product::<usize>() <= 4096 {
                typed(what, host_f32(&*tensors, name, &shape).await);
            }
        }
    }
    Ok(())
}

#[test]
fn single_files_with_mutated_names_and_shapes() {
    let strategy = (0usize..SINGLE_FILES.len(), proptest::collection::vec(name_mutation(), 1..5));
    run(128, 7, strategy, |(which, mutations)| {
        let (fixture, config) = SINGLE_FILES[which];
        let mut tensors = fixture_tensors(fixture).to_vec();
        for m in &mutations {
            mutate_names(&mut tensors, m);
        }
        let file = sparse_file(&tensors, fixture.ends_with(".gguf"));
        let what = format!("{fixture} {mutations:?}");
        // Bytes read past the header count as input too (the file's tensors, read by name).
        let loaded = bounded_by(&what, || pollster::block_on(single_file(&what, &file, config)), || file.prefix.len() + file.served.get() as usize);
        typed(&what, loaded);
    });
    // Unmutated, every fixture loads.
    for (fixture, config) in SINGLE_FILES {
        pollster::block_on(single_file(fixture, &sparse_file(fixture_tensors(fixture), fixture.ends_with(".gguf")), config)).unwrap();
    }
}

/// kohya LoRA keys mapped to SGM's UNet names (`input_blocks_4_1_...`) with hostile indices.
#[test]
fn lora_module_names() {
    let layout = NameLayout { unet_layers: vec![2, 2, 2], linear_projection: true, vae_levels: 4 };
    let part = prop_oneof![hostile_index(), Just("in_layers_2".to_string()), Just("transformer_blocks_0_attn1_to_q".to_string()), Just("op".to_string())];
    let prefix = prop_oneof![Just("input_blocks_"), Just("output_blocks_"), Just("middle_block_"), Just("time_embed_"), Just("")];
    run(512, 8, (prefix, proptest::collection::vec(part, 0..5)), |(prefix, parts)| {
        let key = format!("{prefix}{}", parts.join("_"));
        bounded(&key, key.len(), || drop(sgm_unet_module(&key, &layout)));
    });
}

// ---- Pack manifests.

/// A valid manifest: one shard, a small file, dense and quantized entries of each plane layout.
fn valid_manifest() -> Manifest {
    let seg = |offset: u64, length: u64| vec![Segment { shard: 0, offset, length }];
    let tensor = |name: &str, storage: Storage, shape: Vec<usize>, rows: Option<usize>, cols: Option<usize>, data: Vec<Segment>, scales: Option<Vec<Segment>>, mins: Option<Vec<Segment>>| PackTensor {
        name: name.into(),
        storage,
        shape,
        rows,
        cols,
        data,
        scales,
        mins,
    };
    Manifest {
        format: "sdxl-pack".into(),
        version: 1,
        model: ModelKind::Base,
        quant: QuantPreset::Q8,
        shard_bytes: 4096,
        shards: vec![Shard { path: "shards/00000.bin".into(), bytes: 1024, sha256: "0".repeat(64) }],
        files: vec![PackFile { path: "unet/config.json".into(), bytes: 8, sha256: "0".repeat(64), segments: seg(0, 8) }],
        tensors: vec![
            tensor("unet/a.weight", Storage::F16, vec![4, 8], None, None, seg(8, 64), None, None),
            tensor("unet/b.bias", Storage::F32, vec![8], None, None, seg(72, 32), None, None),
            tensor("unet/q.weight", Storage::Q8_0, vec![2, 32], Some(2), Some(32), seg(104, 64), Some(seg(168, 4)), None),
            tensor("unet/r.weight", Storage::Q4_1, vec![2, 1, 8, 4], Some(2), Some(32), seg(172, 32), Some(seg(204, 4)), Some(seg(208, 4))),
            tensor("text_encoder/k.weight", Storage::Q4_K, vec![1, 256], Some(1), Some(256), seg(212, 144), None, None),
        ],
    }
}

/// A mutation of one field of a manifest's JSON.
#[derive(Debug, Clone)]
enum ManifestMutation {
    /// (JSON pointer into the manifest, value)
    Set(&'static str, Value),
    DuplicateTensor,
}

fn manifest_mutation() -> impl Strategy<Value = ManifestMutation> {
    let pointer = prop_oneof![
        Just("/format"), Just("/version"), Just("/model"), Just("/quant"), Just("/shard_bytes"), Just("/shards/0/path"), Just("/shards/0/bytes"),
        Just("/shards/0/sha256"), Just("/files/0/path"), Just("/files/0/bytes"), Just("/files/0/segments/0/length"), Just("/tensors/0/shape"),
        Just("/tensors/1/shape"), Just("/tensors/2/shape"), Just("/tensors/2/rows"), Just("/tensors/2/cols"), Just("/tensors/3/shape"),
        Just("/tensors/3/cols"), Just("/tensors/4/cols"), Just("/tensors/0/storage"), Just("/tensors/2/storage"), Just("/tensors/0/data/0/offset"),
        Just("/tensors/0/data/0/length"), Just("/tensors/1/data/0/shard"), Just("/tensors/2/scales"), Just("/tensors/3/mins"), Just("/tensors/0/data"),
        Just("/tensors/4/data/0/length"), Just("/tensors/0/name"), Just("/tensors"), Just("/shards"),
    ];
    let value = prop_oneof![
        hostile_u64().prop_map(|n| json!(n)),
        Just(json!([1u64 << 32, 1u64 << 32])),
        Just(json!([1u64 << 63, 2, 0])),
        Just(json!([0, 1u64 << 40, 1u64 << 40])),
        Just(json!([65536, 65536, 65536])),
        Just(json!(vec![1; 5000])),
        Just(json!([])),
        Just(json!(null)),
        Just(json!(-1)),
        Just(json!("../escape")),
        Just(json!("q4_k")),
        Just(json!("f32")),
        Just(json!("unet/")),
        Just(json!([{ "shard": 7, "offset": 0, "length": 4 }])),
        Just(json!([{ "shard": 0, "offset": 18446744073709551612u64, "length": 8 }])),
        // Other shapes of the same values (valid for some entries): the pack opens and reads.
        Just(json!([2, 16])),
        Just(json!([32])),
        Just(json!([2, 2, 16])),
        Just(json!([1, 1, 8])),
    ];
    prop_oneof![(pointer, value).prop_map(|(p, v)| ManifestMutation::Set(p, v)), Just(ManifestMutation::DuplicateTensor)]
}

/// Validates `bytes` as a manifest and, where it is accepted, opens the pack (shards of zeros
/// of the lengths it gives, up to 1 MiB) and reads every tensor.
fn load_pack(what: &str, bytes: &[u8]) {
    let input = bytes.len();
    let result = bounded(what, input, || Pack::from_manifest_bytes(bytes, MANIFEST.into()));
    let Some(pack) = typed(what, result) else { return };
    let mut source = MemorySource::default();
    source.insert(MANIFEST, bytes.to_vec());
    for shard in &pack.manifest().shards {
        source.insert(&shard.path, vec![0; shard.bytes.min(1 << 20) as usize]);
    }
    let shards: usize = pack.manifest().shards.iter().map(|s| s.bytes.min(1 << 20) as usize).sum();
    let read = bounded(what, input + shards, || {
        pollster::block_on(async {
            let (model, pack) = sdxl::pack::open(&source).await?;
            for t in &pack.manifest().tensors {
                let (component, name) = t.name.split_once('/').unwrap();
                let tensors = model.tensors(component).await?;
                typed(what, host_f32(&*tensors, name, &t.shape).await);
            }
            Ok(())
        })
    });
    typed(what, read);
}

#[test]
fn pack_manifests_mutated() {
    let valid = serde_json::to_value(valid_manifest()).unwrap();
    run(384, 9, proptest::collection::vec(manifest_mutation(), 0..3), |mutations| {
        let mut manifest = valid.clone();
        for m in &mutations {
            match m {
                ManifestMutation::Set(pointer, value) => {
                    if let Some(field) = manifest.pointer_mut(pointer) {
                        *field = value.clone();
                    }
                }
                ManifestMutation::DuplicateTensor => {
                    if let Some(tensors) = manifest["tensors"].as_array_mut() {
                        tensors.extend(tensors.first().cloned());
                    }
                }
            }
        }
        load_pack(&format!("{mutations:?}"), &serde_json::to_vec(&manifest).unwrap());
    });
    run(256, 10, proptest::collection::vec(any::<u8>(), 0..256), |bytes| load_pack("random bytes", &bytes));
    // The valid manifest opens, and every tensor reads.
    let bytes = serde_json::to_vec(&valid).unwrap();
    Pack::from_manifest_bytes(&bytes, MANIFEST.into()).unwrap();
    let mut source = MemorySource::default();
    source.insert(MANIFEST, bytes);
    source.insert("shards/00000.bin", vec![0; 1024]);
    pollster::block_on(async {
        let (model, pack) = sdxl::pack::open(&source).await.unwrap();
        for t in &pack.manifest().tensors {
            let (component, name) = t.name.split_once('/').unwrap();
            let values = host_f32(&*model.tensors(component).await.unwrap(), name, &t.shape).await.unwrap();
            assert_eq!(values.len(), t.shape.iter().product::<usize>(), "{}", t.name);
        }
    });
}

// ---- PNG init images.

/// CRC-32 (PNG's, ISO-HDLC) of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, &b| (0..8).fold(crc ^ b as u32, |c, _| if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 }))
}

/// The chunks of a PNG: (type, data).
fn chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 8 <= png.len() {
        let n = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = png[at + 4..at + 8].try_into().unwrap();
        out.push((kind, png[at + 8..(at + 8 + n).min(png.len())].to_vec()));
        at += 12 + n;
    }
    out
}

/// A PNG of `chunks`, with correct lengths and CRCs (so a mutation reaches the decoder).
fn png_of(chunks: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in chunks {
        out.extend((data.len() as u32).to_be_bytes());
        let body = [&kind[..], data].concat();
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    out
}

#[derive(Debug, Clone)]
enum PngMutation {
    /// Width and height of IHDR.
    Size(u32, u32),
    Width(u32),
    Height(u32),
    /// Bit depth and colour type bytes of IHDR.
    Format(u8, u8),
    Interlace(u8),
    DropIdat,
    CutIdat(usize),
    FlipIdat(usize, u8),
    Chunk([u8; 4], Vec<u8>),
}

fn png_mutation() -> impl Strategy<Value = PngMutation> {
    let side = prop_oneof![Just(0u32), Just(1), Just(8193), Just(1 << 16), Just(1 << 31), Just(u32::MAX), 1u32..2048];
    prop_oneof![
        (256u32..8192, 256u32..8192).prop_map(|(w, h)| PngMutation::Size(w, h)),
        side.clone().prop_map(PngMutation::Width),
        side.prop_map(PngMutation::Height),
        (prop_oneof![Just(1u8), Just(2), Just(4), Just(8), Just(16), any::<u8>()], prop_oneof![Just(0u8), Just(2), Just(3), Just(4), Just(6), any::<u8>()]).prop_map(|(d, c)| PngMutation::Format(d, c)),
        (0u8..3).prop_map(PngMutation::Interlace),
        Just(PngMutation::DropIdat),
        any::<usize>().prop_map(PngMutation::CutIdat),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| PngMutation::FlipIdat(i, b)),
        (prop_oneof![Just(*b"tEXt"), Just(*b"zTXt"), Just(*b"iTXt"), Just(*b"iCCP"), Just(*b"PLTE"), Just(*b"tRNS"), Just(*b"acTL"), Just(*b"fcTL")], proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(k, d)| PngMutation::Chunk(k, d)),
    ]
}

fn decode(what: &str, png: &[u8]) {
    let input = png.len();
    let image = bounded_by(what, || decode_png(png), || input);
    if let Some(image) = typed(what, image) {
        assert_eq!(image.rgb.len(), 3 * image.width * image.height, "{what}");
    }
    // The same bytes as an inpainting mask: binary values, or a typed error (a colour image).
    let mask = bounded_by(what, || decode_mask_png(png), || input);
    if let Some(mask) = typed(what, mask) {
        assert_eq!(mask.values.len(), mask.width * mask.height, "{what}");
        assert!(mask.values.iter().all(|&v| v == 0.0 || v == 1.0), "{what}: a mask is binary");
    }
}

#[test]
fn png_mutated_images() {
    let strategy = (1usize..24, 1usize..24, any::<u64>(), proptest::collection::vec(png_mutation(), 1..4));
    run(384, 11, strategy, |(width, height, seed, mutations)| {
        let rgb: Vec<u8> = (0..width * height * 3).map(|i| (seed.rotate_left(i as u32 % 64) as u8).wrapping_add(i as u8)).collect();
        let mut chunks = chunks(&encode_png(&rgb, width, height, "hostile").unwrap());
        for m in &mutations {
            let idat = chunks.iter().position(|(k, _)| k == b"IDAT");
            match m.clone() {
                PngMutation::Size(w, h) => chunks[0].1[0..8].copy_from_slice(&[w.to_be_bytes(), h.to_be_bytes()].concat()),
                PngMutation::Width(w) => chunks[0].1[0..4].copy_from_slice(&w.to_be_bytes()),
                PngMutation::Height(h) => chunks[0].1[4..8].copy_from_slice(&h.to_be_bytes()),
                PngMutation::Format(d, c) => (chunks[0].1[8], chunks[0].1[9]) = (d, c),
                PngMutation::Interlace(i) => chunks[0].1[12] = i,
                PngMutation::DropIdat => drop(idat.map(|i| chunks.remove(i))),
                PngMutation::CutIdat(n) => {
                    if let Some(data) = idat.map(|i| &mut chunks[i].1) {
                        data.truncate(n % (data.len() + 1));
                    }
                }
                PngMutation::FlipIdat(at, b) => {
                    if let Some(data) = idat.map(|i| &mut chunks[i].1).filter(|d| !d.is_empty()) {
                        let n = data.len();
                        data[at % n] = b;
                    }
                }
                PngMutation::Chunk(kind, data) => chunks.insert(1, (kind, data)),
            }
        }
        decode(&format!("{width}x{height} {mutations:?}"), &png_of(&chunks));
    });
    run(256, 12, proptest::collection::vec(any::<u8>(), 0..256), |bytes| {
        decode("random bytes", &bytes);
        decode("random chunks", &[&b"\x89PNG\r\n\x1a\n"[..], &bytes].concat());
    });
}

/// A small PNG that claims 4096x4096 RGBA (within the 16 MP a run takes) is refused before its
/// 64 MiB buffer is allocated: its few bytes of image data cannot hold that many pixels.
#[test]
fn png_claiming_more_pixels_than_its_data_holds() {
    let mut chunks = chunks(&encode_png(&[7; 3 * 16 * 16], 16, 16, "").unwrap());
    chunks[0].1[0..10].copy_from_slice(&[0, 0, 16, 0, 0, 0, 16, 0, 8, 6]);
    let png = png_of(&chunks);
    let err = bounded("4096x4096 in a few bytes", png.len(), || decode_png(&png)).unwrap_err();
    assert!(err.to_string().contains("4096x4096") && err.to_string().contains("image data"), "{err}");
}

// ---- The tokenizer and weighted prompts.

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| pollster::block_on(ClipTokenizer::load(&infer::sdxl_files(Kind::Base), "tokenizer_2")).unwrap())
}

/// Text built of pieces prompts and attackers use: specials, brackets, weights, BREAK, every
/// kind of Unicode the cleaning touches, long runs.
fn prompt_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<|endoftext|>".to_string()), Just("<|startoftext|>".into()), Just("!".into()), Just("(".into()), Just(")".into()), Just("[".into()),
        Just("]".into()), Just(":".into()), Just("\\".into()), Just(":1.5)".into()), Just(":-2)".into()), Just(":1e308)".into()), Just(":.)".into()),
        Just(" BREAK ".into()), Just("BREAK".into()), Just("a photo of a fox".into()), Just("\u{ff01}\u{3000}\u{fb01}".into()), Just("\u{0301}\u{200b}\u{202e}".into()),
        Just("\u{1F98A}".into()), Just("\u{0000}\u{0007}\t\n".into()), Just("’“”".into()), Just("x".repeat(500)), Just("!".repeat(300)),
        any::<String>(),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

#[test]
fn tokenizer_hostile_text() {
    let tokenizer = tokenizer();
    run(256, 13, prompt_text(), |text| {
        let ids = bounded(&format!("{text:?}"), text.len(), || tokenizer.encode(&text));
        let ids = typed(&text, ids).expect("any text tokenizes");
        assert_eq!(ids.len(), tokenizer.max_length);
    });
}

/// Tokenizer folders with hostile files: merges that are not pairs, special tokens missing from
/// the vocabulary, odd `model_max_length`s.
#[test]
fn tokenizer_hostile_files() {
    let line = prop_oneof![Just("a b".to_string()), Just("#version: 0.2".into()), Just("ab".into()), Just("a b c".into()), Just("".into()), any::<String>()];
    let max_length = prop_oneof![Just(json!(77)), Just(json!(2)), Just(json!(1)), Just(json!(-1)), Just(json!(1e300)), Just(json!("77")), Just(json!(null))];
    let special = prop_oneof![Just(json!("<|endoftext|>")), Just(json!({ "content": "a</w>" })), Just(json!("missing")), Just(json!(3))];
    run(64, 14, (proptest::collection::vec(line, 0..8), max_length, special, prompt_text()), |(lines, max_length, special, text)| {
        let mut files = MemorySource::default();
        let vocab = json!({ "a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab</w>": 4, "<|startoftext|>": 5, "<|endoftext|>": 6 });
        files.insert("t/vocab.json", serde_json::to_vec(&vocab).unwrap());
        files.insert("t/merges.txt", lines.join("\n").into_bytes());
        files.insert("t/tokenizer_config.json", serde_json::to_vec(&json!({ "model_max_length": max_length, "pad_token": special })).unwrap());
        let input = lines.iter().map(String::len).sum::<usize>() + text.len() + 256;
        let encoded = bounded(&format!("{lines:?}"), input, || pollster::block_on(async { ClipTokenizer::load(&files, "t").await?.encode(&text) }));
        typed("tokenizer files", encoded);
    });
}

#[test]
fn weighted_prompts_hostile_text() {
    let tokenizer = tokenizer();
    run(256, 15, prompt_text(), |text| {
        let what = format!("{text:?}");
        bounded(&what, text.len(), || typed(&what, parse_prompt_attention(&text)));
        let windows = bounded(&what, text.len(), || {
            let mut tokens = WeightedTokens::new(tokenizer, &text, true)?;
            tokens.pad_to(tokens.ids.len() + 3, tokenizer.eos_id);
            tokens.windows(tokenizer.bos_id, tokenizer.eos_id)
        });
        if let Some(windows) = typed(&what, windows) {
            assert!(windows.iter().all(|(ids, weights)| ids.len() == weights.len() && ids.len() <= 77), "{what}");
        }
    });
}

// ---- HTTP answers: range reads of the native client against a server that answers each
// connection with generated bytes.

/// A server on a free local port that answers its one connection with `answer` (after reading
/// the request's head), then closes it.
fn answering(answer: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else { return };
        let (mut head, mut byte) = (Vec::new(), [0u8]);
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let _ = stream.write_all(&answer);
    });
    url
}

fn http_answer() -> impl Strategy<Value = Vec<u8>> {
    let (start, end) = HTTP_RANGE;
    let status = prop_oneof![Just(200u16), Just(206), Just(206), Just(302), Just(404), Just(416), Just(503), 100u16..1000];
    let range = prop_oneof![
        Just(Some(format!("bytes {start}-{}/100000", end - 1))),
        Just(Some(format!("bytes {}-{end}/100000", start + 1))),
        Just(Some("bytes */100000".to_string())),
        Just(Some(format!("bytes {start}-18446744073709551615/*"))),
        Just(None),
        any::<String>().prop_map(Some),
    ];
    let want = (end - start) as usize;
    let length = prop_oneof![Just(Some(want.to_string())), Just(Some((want + 7).to_string())), Just(Some("3".to_string())), Just(Some("99999999999999999999999".to_string())), Just(Some("-1".to_string())), Just(None)];
    let body = prop_oneof![Just(vec![7u8; want]), Just(vec![7u8; want + 1]), Just(vec![7u8; want / 2]), proptest::collection::vec(any::<u8>(), 0..3 * want)];
    let framing = prop_oneof![Just("plain"), Just("chunked"), Just("bad-chunks")];
    let structured = (status, range, length, body, framing).prop_map(|(status, range, length, body, framing)| {
        let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
        if let Some(r) = range {
            head += &format!("Content-Range: {}\r\n", r.replace(['\r', '\n'], ""));
        }
        let mut out = Vec::new();
        match framing {
            "plain" => {
                if let Some(n) = length {
                    head += &format!("Content-Length: {n}\r\n");
                }
                out.extend(head.into_bytes());
                out.extend(b"\r\n");
                out.extend(body);
            }
            _ => {
                out.extend(format!("{head}Transfer-Encoding: chunked\r\n\r\n").into_bytes());
                for piece in body.chunks(1000) {
                    let size = if framing == "chunked" { format!("{:x}", piece.len()) } else { "ffffffffffffffffff".into() };
                    out.extend(format!("{size}\r\n").into_bytes());
                    out.extend(piece);
                    out.extend(b"\r\n");
                }
                out.extend(b"0\r\n\r\n");
            }
        }
        out
    });
    prop_oneof![3 => structured, 1 => proptest::collection::vec(any::<u8>(), 0..2048)]
}

/// The range the hostile HTTP cases read.
const HTTP_RANGE: (u64, u64) = (1000, 3000);

#[test]
fn http_answers_to_range_reads() {
    let (start, end) = HTTP_RANGE;
    // Both outcomes must occur: a server that never answered would pass every case.
    let (read, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    run(256, 16, http_answer(), |answer| {
        let what = format!("{:?}", String::from_utf8_lossy(&answer[..answer.len().min(200)]));
        let url = answering(answer.clone());
        let source = HttpSource::new(&url).unwrap().with_retries(0).with_stall_timeout(2000);
        let got = bounded(&what, answer.len(), || pollster::block_on(source.fetch("f.bin", start, end)));
        match got {
            Ok(bytes) => {
                assert_eq!(bytes.len(), end - start, "{what}: a read gives the bytes asked for, exactly");
                read.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::Network { .. }) => drop(refused.fetch_add(1, Ordering::Relaxed)),
            Err(e) => panic!("{what}: unexpected error kind {e:?}"),
        }
    });
    let (read, refused) = (read.into_inner(), refused.into_inner());
    assert!(read > 0 && refused > 0, "{read} answers read, {refused} refused");
}

// ---- Configs: nothing that would generate an unbounded shader gets to the GPU.

/// Heads wider than the attention kernel is generated for are refused while the config is
/// checked (a 2^20-wide head took more than 60 s and 24 GB to compile).
#[test]
fn huge_attention_heads_are_refused_with_the_config() {
    let unet: UNet2DConditionConfig = serde_json::from_value(json!({
        "block_out_channels": [1 << 20], "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
        "attention_head_dim": 1, "layers_per_block": 1,
    }))
    .unwrap();
    let message = unet.layout().unwrap_err();
    assert!(message.contains("down_blocks.0") && message.contains("1048576 wide") && message.contains("256"), "{message}");
    let clip: ClipTextConfig = serde_json::from_value(json!({ "hidden_size": 1 << 20, "num_attention_heads": 2 })).unwrap();
    let message = clip.check().unwrap_err();
    assert!(message.contains("524288 wide"), "{message}");
    // SDXL's own configs pass.
    let files = infer::sdxl_files(Kind::Base);
    let read = |path: &str| pollster::block_on(files.read(path)).unwrap();
    serde_json::from_slice::<UNet2DConditionConfig>(&read("unet/config.json")).unwrap().layout().unwrap();
    for encoder in ["text_encoder", "text_encoder_2"] {
        serde_json::from_slice::<ClipTextConfig>(&read(&format!("{encoder}/config.json"))).unwrap().check().unwrap();
    }
}

// ---- Linear time: sixteen times the tensors, about sixteen times the time (quadratic: 256). The
// bound, 64×, leaves a factor of four either way for a busy machine and cache effects.

/// Seconds of the fastest of five runs of `a` and of `b`, run in turns (so that a busy machine
/// slows both alike).
fn fastest(a: impl Fn(), b: impl Fn()) -> (f64, f64) {
    let _alone = TIMING.write().unwrap_or_else(|e| e.into_inner());
    let time = |f: &dyn Fn()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    (0..5).fold((f64::INFINITY, f64::INFINITY), |(x, y), _| (x.min(time(&a)), y.min(time(&b))))
}

#[test]
fn safetensors_header_parsing_is_linear() {
    let header = |n: usize| {
        let map: serde_json::Map<String, Value> = (0..n).map(|i| (format!("model.diffusion_model.input_blocks.{i}.0.weight"), json!({ "dtype": "F16", "shape": [2, 2], "data_offsets": [8 * i, 8 * i + 8] }))).collect();
        (serde_json::to_vec(&map).unwrap(), 8 * n as u64)
    };
    let ((small, small_data), (large, large_data)) = (header(5_000), header(80_000));
    let parse = |json: &[u8], data: u64| assert!(safetensors::parse_header(ST, json, 8 + json.len() as u64 + data).is_ok());
    let (s, l) = fastest(|| parse(&small, small_data), || parse(&large, large_data));
    assert!(l < 64.0 * s, "5k tensors → {s:.4} s, 80k → {l:.4} s: not linear");
}

#[test]
fn gguf_header_parsing_is_linear() {
    let file = |n: usize| {
        let mut g = RawGguf { tensors: Vec::new(), ..RawGguf::valid() };
        g.tensors = (0..n).map(|i| RawInfo { name: format!("model.diffusion_model.input_blocks.{i}.0.weight").into_bytes(), ne: vec![8], type_id: 0, offset: 32 * i as u64 }).collect();
        g.data = 32 * n as u64;
        g.bytes()
    };
    let (small, large) = (file(5_000), file(80_000));
    let parse = |bytes: &[u8]| assert!(matches!(gguf::parse_header("linear.gguf", bytes, bytes.len() as u64), Ok(Parsed::Header(_))));
    let (s, l) = fastest(|| parse(&small), || parse(&large));
    assert!(l < 64.0 * s, "5k tensors → {s:.4} s, 80k → {l:.4} s: not linear");
}

/// Name mapping and config inference over a single file with many UNet blocks.
#[test]
fn single_file_mapping_is_linear() {
    let file = |n: usize| {
        let mut tensors = fixture_tensors("tiny-sdxl-std.gguf").to_vec();
        let block = |i: usize, name: &str| (format!("model.diffusion_model.input_blocks.{}.{name}", 100 + i), "F16".to_string(), vec![64]);
        tensors.extend((0..n).flat_map(|i| [block(i, "0.out_layers.3.weight"), block(i, "1.transformer_blocks.0.attn1.to_q.weight")]));
        sparse_file(&tensors, true)
    };
    let (small, large) = (file(2_000), file(32_000));
    let load = |f: &Sparse| drop(pollster::block_on(ModelSource::single_file(f, "model", None)));
    let (s, l) = fastest(|| load(&small), || load(&large));
    assert!(l < 64.0 * s, "2k blocks → {s:.4} s, 32k → {l:.4} s: not linear");
}

/// Inpainting a crop around the mask (diffusers' padding_mask_crop) on arbitrary images, masks,
/// run sizes and paddings: a typed error or the original's size back, within bounds.
#[test]
fn inpainting_crops_of_any_shape() {
    use sdxl::pipeline::crop::{crop_for_run, Pixels};
    let strategy = (1usize..40, 1usize..40, 1usize..48, 1usize..48, 0usize..200, any::<u64>(), 0u8..4);
    run(160, 17, strategy, |(w, h, rw, rh, pad, seed, kind)| {
        let byte = |i: usize| (seed.rotate_left((i % 64) as u32) as u8).wrapping_mul(i as u8 | 1);
        let image = Pixels::new(w, h, 3, (0..w * h * 3).map(byte).collect()).unwrap();
        // Empty, full, one pixel, or noise.
        let mask: Vec<u8> = (0..w * h).map(|i| match kind { 0 => 0, 1 => 255, 2 => if i == (seed as usize) % (w * h) { 200 } else { 0 }, _ => byte(i + 7) }).collect();
        let mask = Pixels::new(w, h, 1, mask).unwrap();
        let what = format!("{w}x{h} image, {rw}x{rh} run, padding {pad}, mask kind {kind}");
        let input = (w * h * 4 + rw * rh * 4) * 4;
        let pasted = bounded(&what, input, || {
            let run = crop_for_run(&image, &mask, rw, rh, pad)?;
            let [x1, y1, x2, y2] = run.region;
            assert!(x1 < x2 && x2 <= w && y1 < y2 && y2 <= h, "{what}: region {:?}", run.region);
            assert_eq!((run.image.width, run.image.height, run.mask.width, run.mask.height), (rw, rh, rw, rh), "{what}");
            let generated: Vec<f32> = (0..3 * rw * rh).map(|i| byte(i) as f32 / 255.0).collect();
            Ok::<_, Error>(run.paste_back(&generated))
        });
        if let Some(pasted) = typed(&what, pasted) {
            assert_eq!((pasted.width, pasted.height, pasted.data.len()), (w, h, w * h * 3), "{what}");
        }
    });
}
