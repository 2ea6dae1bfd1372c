//! GGUF files (crate/src/weights/gguf.rs), on the CPU: a file written by ggml's own Python package
//! (tests/fixtures/make_gguf_reference.py) must parse, dequantize bit-exactly as gguf-py does and
//! re-quantize to the same bytes; our writer's files round-trip every type within each format's
//! error bound; repacked blocks dequantize bit-identically to ggml's formulas; malformed files
//! give typed errors that name the problem.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;

use common::random;
use half::f16;
use sdxl::quant::{self, QuantFormat, BLOCK};
use sdxl::weights::gguf::{
    self, dequantize, parse_header, quantize, read_header, repack, GgmlType, GgufHeader, GgufWriter, MetadataValue, Parsed, Repacked,
};
use sdxl::weights::names::Entry;
use sdxl::weights::{safetensors, DirSource, FileTensors, MemorySource, SharedSource, Source};
use sdxl::Error;

const FILE: &str = "model.gguf";

fn parse(bytes: &[u8]) -> sdxl::Result<GgufHeader> {
    match parse_header(FILE, bytes, bytes.len() as u64)? {
        Parsed::Header(header) => Ok(header),
        Parsed::NeedBytes(n) => panic!("the whole file is given, yet the parser asks for {n} bytes"),
    }
}

fn bytes_of<'a>(file: &'a [u8], header: &GgufHeader, name: &str) -> &'a [u8] {
    let t = header.tensor(name).unwrap_or_else(|| panic!("tensor {name}"));
    &file[t.start as usize..t.end as usize]
}

/// ggml's dequantize_row_* transcribed from ggml-quants.c on the raw block bytes (independent of
/// the crate's block decoding).
fn ggml_reference_dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let h = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut y = Vec::new();
    match ggml_type {
        GgmlType::F32 => y.extend(bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()))),
        GgmlType::F16 => y.extend(bytes.chunks(2).map(|b| h(b, 0))),
        GgmlType::BF16 => y.extend(bytes.chunks(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))),
        GgmlType::Q8_0 => {
            for b in bytes.chunks(34) {
                y.extend(b[2..].iter().map(|&q| q as i8 as i32 as f32 * h(b, 0)));
            }
        }
        _ => {
            // Q4_0, Q4_1, Q5_0, Q5_1: [d][m for *_1][qh for Q5_*][qs].
            let affine = matches!(ggml_type, GgmlType::Q4_1 | GgmlType::Q5_1);
            let five_bit = matches!(ggml_type, GgmlType::Q5_0 | GgmlType::Q5_1);
            let offset = if affine { 0 } else if five_bit { 16 } else { 8 };
            for b in bytes.chunks(ggml_type.block_bytes()) {
                let (d, m) = (h(b, 0), if affine { h(b, 2) } else { 0.0 });
                let mut at = if affine { 4 } else { 2 };
                let qh = if five_bit { u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) } else { 0 };
                at += if five_bit { 4 } else { 0 };
                let qs = &b[at..];
                let mut block = [0f32; 32];
                for j in 0..16 {
                    let xh_0 = (((qh >> j) << 4) & 0x10) as i32;
                    let xh_1 = ((qh >> (j + 12)) & 0x10) as i32;
                    let x0 = ((qs[j] & 0x0F) as i32 | xh_0) - offset;
                    let x1 = ((qs[j] >> 4) as i32 | xh_1) - offset;
                    // No `+ m` for the symmetric types: it would turn ggml's −0.0 into +0.0.
                    let value = |x: i32| if affine { x as f32 * d + m } else { x as f32 * d };
                    (block[j], block[j + 16]) = (value(x0), value(x1));
                }
                y.extend(block);
            }
        }
    }
    y
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Checks `repack` against ggml's values: quantized tensors in our format must dequantize to the
/// very same f32 bits, dense ones must be those values.
fn check_repack(header: &GgufHeader, file: &[u8], name: &str, want: &[f32]) {
    let t = header.tensor(name).unwrap();
    match repack(t, bytes_of(file, header, name)).unwrap() {
        Repacked::Quantized(q) => {
            q.validate().unwrap();
            let (rows, cols) = t.matrix_dims();
            assert_eq!((q.rows, q.cols), (rows, cols), "{name}: matrix dims");
            let format = match t.ggml_type {
                GgmlType::Q4_0 => QuantFormat::Q4_0,
                GgmlType::Q4_1 => QuantFormat::Q4_1,
                GgmlType::Q8_0 | GgmlType::Q5_0 => QuantFormat::Q8_0,
                GgmlType::Q2_K => QuantFormat::Q2_K,
                GgmlType::Q3_K => QuantFormat::Q3_K,
                GgmlType::Q4_K => QuantFormat::Q4_K,
                GgmlType::Q5_K => QuantFormat::Q5_K,
                GgmlType::Q6_K => QuantFormat::Q6_K,
                other => panic!("{name}: {other:?} must not repack to a quantized tensor"),
            };
            assert_eq!(q.format, format, "{name}");
            assert_eq!(bits(&quant::dequantize(&q)), bits(want), "{name}: repacked blocks dequantize differently");
        }
        Repacked::Dense(values) => {
            let dense = t.shape.len() < 2 || matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q5_1);
            assert!(dense, "{name}: {:?} {:?} served dense", t.ggml_type, t.shape);
            assert_eq!(bits(&values), bits(want), "{name}: dense values");
        }
    }
}

// ---- A file written by gguf-py (ggml's Python package).

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../tests/fixtures/reference/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn expected_values() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let file = fixture_bytes("gguf_reference.safetensors");
    let n = safetensors::header_len("expected", &file, file.len() as u64).unwrap() as usize;
    let header = safetensors::parse_header("expected", &file[8..8 + n], file.len() as u64).unwrap();
    header
        .tensors
        .into_iter()
        .map(|(name, info)| (name, (info.shape, safetensors::to_f32(info.dtype, &file[info.start as usize..info.end as usize]))))
        .collect()
}

#[test]
fn reads_gguf_py_file_exactly() {
    let dir = DirSource::new(format!("{}/../tests/fixtures/reference", env!("CARGO_MANIFEST_DIR")));
    let header = pollster::block_on(read_header(&dir, "gguf_reference.gguf")).unwrap();
    let file = fixture_bytes("gguf_reference.gguf");
    assert_eq!(header.version, 3);
    assert_eq!(header.alignment, 64);
    assert_eq!(header.data_start % 64, 0);
    assert_eq!(header.architecture(), Some("sdxl-test"));
    use MetadataValue as V;
    let want_metadata = [
        ("general.architecture", V::String("sdxl-test".into())),
        ("general.alignment", V::U32(64)),
        ("test.u8", V::U8(200)),
        ("test.i8", V::I8(-100)),
        ("test.u16", V::U16(60000)),
        ("test.i16", V::I16(-30000)),
        ("test.u32", V::U32(4_000_000_000)),
        ("test.i32", V::I32(-2_000_000_000)),
        ("test.f32", V::F32(0.25)),
        ("test.bool", V::Bool(true)),
        ("test.string", V::String("grüße".into())),
        ("test.array_i32", V::Array(vec![V::I32(1), V::I32(-2), V::I32(3)])),
        ("test.array_string", V::Array(vec![V::String("a".into()), V::String("bc".into())])),
        ("test.u64", V::U64((1 << 40) + 1)),
        ("test.i64", V::I64(-(1 << 40))),
        ("test.f64", V::F64(-1.5)),
    ];
    let want_metadata: BTreeMap<String, MetadataValue> = want_metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(header.metadata, want_metadata);

    let expected = expected_values();
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 3 * GgmlType::ALL.len(), "{names:?}");
    for ggml_type in GgmlType::ALL {
        let k = QuantFormat::ALL.iter().any(|f| f.is_k() && f.name() == ggml_type.name().to_lowercase());
        for kind in ["matrix", "conv", "vector"] {
            let name = format!("{}.{kind}", ggml_type.name().to_lowercase());
            let t = header.tensor(&name).unwrap_or_else(|| panic!("tensor {name}"));
            let (shape, want) = &expected[&name];
            assert_eq!(t.ggml_type, ggml_type, "{name}");
            assert_eq!(&t.shape, shape, "{name}: torch-order shape");
            assert_eq!(t.start % 64, 0, "{name}: aligned");
            let bytes = bytes_of(&file, &header, &name);
            assert_eq!(bits(&dequantize(ggml_type, bytes)), bits(want), "{name}: dequantized differently from gguf-py");
            if k {
                // gguf-py cannot quantize K-quants: the file holds random blocks (sane scales), and
                // gguf-py's dequantization is the reference.
                assert!(want.iter().all(|v| v.is_finite()), "{name}");
            } else {
                let (_, source) = &expected[&format!("{name}.source")];
                assert_eq!(bits(&ggml_reference_dequantize(ggml_type, bytes)), bits(want), "{name}: test's ggml transcription");
                assert!(quantize(ggml_type, source).unwrap() == bytes, "{name}: our quantizer's bytes differ from gguf-py's");
            }
            check_repack(&header, &file, &name, want);
        }
    }
}

// ---- Files from our writer.

/// Values of rows with very different magnitudes, a zero block, a constant block and an outlier.
fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = random(n, seed).iter().enumerate().map(|(i, x)| x * [0.003, 0.5, 2.0, 90.0][(i / 64) % 4]).collect();
    v[..32].fill(0.0);
    if n >= 96 {
        v[32..64].fill(-0.61);
        v[70] = 250.0;
    }
    v
}

/// The error bound of one block of a format (ggml's quantizers, f16 block parameters).
fn block_bound(ggml_type: GgmlType, block: &[f32]) -> f32 {
    let (lo, hi) = block.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let amax = lo.abs().max(hi.abs());
    let f16_rel = 1.0 / 2048.0; // one f16 rounding
    let slack = 1.0 + 4.0 * f16_rel;
    match ggml_type {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => amax * f16_rel,
        GgmlType::BF16 => amax / 256.0,
        GgmlType::Q8_0 => amax / 127.0 * 0.5 * slack + amax * f16_rel,
        // The extreme maps to code 0; the opposite side clamps at code 15 (31): up to one step.
        GgmlType::Q4_0 => amax / 8.0 * slack,
        GgmlType::Q5_0 => amax / 16.0 * slack,
        // Half a step, plus the min's f16 rounding and the scale's over the 15 (31) steps.
        GgmlType::Q4_1 => (hi - lo) / 15.0 * (0.5 + 15.0 * f16_rel) * slack + lo.abs() * f16_rel,
        GgmlType::Q5_1 => (hi - lo) / 31.0 * (0.5 + 31.0 * f16_rel) * slack + lo.abs() * f16_rel,
        // K-quants (blocks of 256, kquants::quantize_block): a sub-block's rounding plus the
        // quantization of its scale and min against the block's d and dmin (T levels).
        GgmlType::Q2_K => amax * (1.0 / 3.0 + 2.0 / 15.0) * 1.1,
        GgmlType::Q4_K => amax * (1.0 / 15.0 + 2.0 / 63.0) * 1.1,
        GgmlType::Q5_K => amax * (1.0 / 31.0 + 2.0 / 63.0) * 1.1,
        GgmlType::Q3_K => amax * (1.0 / 4.0 + 1.0 / 62.0) * 1.1,
        GgmlType::Q6_K => amax * (1.0 / 32.0 + 1.0 / 254.0) * 1.1,
    }
}

const SHAPES: [&[usize]; 4] = [&[5, 96], &[3, 2, 1, 64], &[64], &[7, 32]];
/// The K-quants' shapes: rows of whole 256-value blocks.
const K_SHAPES: [&[usize]; 3] = [&[3, 512], &[2, 1, 1, 256], &[256]];

fn shapes(ggml_type: GgmlType) -> &'static [&'static [usize]] {
    if ggml_type.block_values() == 256 {
        &K_SHAPES
    } else {
        &SHAPES
    }
}

fn written_file(alignment: Option<u32>) -> (Vec<u8>, BTreeMap<String, Vec<f32>>) {
    let mut writer = GgufWriter::new();
    writer.metadata("general.architecture", MetadataValue::String("sdxl".into()));
    if let Some(a) = alignment {
        writer.metadata("general.alignment", MetadataValue::U32(a));
    }
    writer.metadata("nested", MetadataValue::Array(vec![MetadataValue::Array(vec![MetadataValue::F64(0.5)]), MetadataValue::Array(vec![])]));
    writer.metadata("flag", MetadataValue::Bool(false));
    let mut values = BTreeMap::new();
    for (i, ggml_type) in GgmlType::ALL.into_iter().enumerate() {
        for (s, shape) in shapes(ggml_type).iter().enumerate() {
            let name = format!("{}.{s}", ggml_type.name());
            let v = test_values(shape.iter().product(), (i * 10 + s) as u64);
            writer.tensor(&name, shape, ggml_type, &v).unwrap();
            values.insert(name, v);
        }
    }
    (writer.to_bytes(), values)
}

#[test]
fn writer_round_trips_every_type() {
    for alignment in [None, Some(128)] {
        let (file, values) = written_file(alignment);
        let header = parse(&file).unwrap();
        assert_eq!(header.alignment, alignment.map_or(32, u64::from));
        assert_eq!(header.architecture(), Some("sdxl"));
        assert_eq!(header.metadata["nested"], MetadataValue::Array(vec![MetadataValue::Array(vec![MetadataValue::F64(0.5)]), MetadataValue::Array(vec![])]));
        assert_eq!(header.metadata["flag"], MetadataValue::Bool(false));
        assert_eq!(header.tensors.len(), values.len());
        for ggml_type in GgmlType::ALL {
            let mut worst = 0f32;
            let block_values = ggml_type.block_values().max(BLOCK);
            for (s, shape) in shapes(ggml_type).iter().enumerate() {
                let name = format!("{}.{s}", ggml_type.name());
                let t = header.tensor(&name).unwrap();
                assert_eq!((t.ggml_type, t.shape.as_slice()), (ggml_type, *shape), "{name}");
                assert_eq!(t.start % header.alignment, 0, "{name}: aligned");
                let bytes = bytes_of(&file, &header, &name);
                let got = dequantize(ggml_type, bytes);
                if block_values == BLOCK {
                    let reference = ggml_reference_dequantize(ggml_type, bytes);
                    assert_eq!(bits(&got), bits(&reference), "{name}: dequantize vs ggml's formulas");
                }
                check_repack(&header, &file, &name, &got);
                let original = &values[&name];
                for (b, (block, deq)) in original.chunks(block_values).zip(got.chunks(block_values)).enumerate() {
                    let bound = block_bound(ggml_type, block);
                    for (x, y) in block.iter().zip(deq) {
                        assert!((x - y).abs() <= bound, "{name} block {b}: {x} -> {y}, error beyond the {bound} bound");
                        worst = worst.max((x - y).abs() / bound.max(f32::MIN_POSITIVE));
                    }
                }
                // The zero block is exact in every format.
                assert!(got[..32].iter().all(|&v| v == 0.0), "{name}: zero block");
            }
            eprintln!("{}: worst error {:.3} of its bound", ggml_type.name(), worst);
        }
    }
}

#[test]
fn quantized_values_on_the_grid_round_trip_exactly() {
    // A Q8_0 block's dequantized values quantize back to the same bytes (ggml's grid is stable),
    // as do Q4_0's: re-converting a GGUF must not drift.
    for ggml_type in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0] {
        let bytes = quantize(ggml_type, &test_values(256, 7)).unwrap();
        let again = quantize(ggml_type, &dequantize(ggml_type, &bytes)).unwrap();
        let (a, b) = (dequantize(ggml_type, &bytes), dequantize(ggml_type, &again));
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(diff <= scale * 2e-3, "{}: re-quantizing moved values by {diff}", ggml_type.name());
    }
}

/// A source that records the byte ranges read.
struct Recording {
    inner: MemorySource,
    reads: RefCell<Vec<(u64, u64)>>,
}

impl Source for Recording {
    fn describe(&self, path: &str) -> String {
        self.inner.describe(path)
    }
    async fn exists(&self, path: &str) -> bool {
        self.inner.exists(path).await
    }
    async fn len(&self, path: &str) -> sdxl::Result<u64> {
        self.inner.len(path).await
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> sdxl::Result<Vec<u8>> {
        self.reads.borrow_mut().push((start, end));
        self.inner.read_range(path, start, end).await
    }
}

#[test]
fn header_is_read_incrementally() {
    // A header far larger than the first read (a long metadata string and 3000 tensor infos), then
    // 8 MiB of data that must not be read.
    let mut writer = GgufWriter::new();
    writer.metadata("long", MetadataValue::String("x".repeat(700_000)));
    let v = vec![0.5f32; 32];
    for i in 0..3000 {
        writer.tensor(&format!("model.diffusion_model.input_blocks.{i}.0.weight"), &[1, 32], GgmlType::Q8_0, &v).unwrap();
    }
    writer.tensor("big", &[2048, 1024], GgmlType::F32, &vec![1.0; 2048 * 1024]).unwrap();
    let file = writer.to_bytes();
    let mut inner = MemorySource::default();
    inner.insert(FILE, file.clone());
    let source = Recording { inner, reads: RefCell::new(Vec::new()) };
    let header = pollster::block_on(read_header(&source, FILE)).unwrap();
    assert_eq!(header, parse(&file).unwrap());
    let reads = source.reads.borrow();
    assert!(reads.len() > 1, "one read of {:?} cannot have covered a {}-byte header", reads, header.data_start);
    assert!(reads.windows(2).all(|w| w[0].1 == w[1].0), "reads continue each other: {reads:?}");
    let read: u64 = reads.iter().map(|(s, e)| e - s).sum();
    assert!(read < 2 * header.data_start, "read {read} bytes for a {}-byte header", header.data_start);
    assert!(read < file.len() as u64 / 2);
}

// ---- Malformed files.

fn small_file() -> Vec<u8> {
    let mut writer = GgufWriter::new();
    writer.metadata("general.architecture", MetadataValue::String("sdxl".into()));
    writer.tensor("a.weight", &[2, 64], GgmlType::Q8_0, &test_values(128, 1)).unwrap();
    writer.tensor("b.weight", &[3, 32], GgmlType::Q4_1, &test_values(96, 2)).unwrap();
    writer.to_bytes()
}

fn gguf_message(result: sdxl::Result<GgufHeader>) -> String {
    match result {
        Err(Error::Gguf { path, message }) => {
            assert_eq!(path, FILE);
            message
        }
        other => panic!("expected a GGUF error, got {other:?}"),
    }
}

#[test]
fn rejects_bad_magic_version_and_endianness() {
    let mut file = small_file();
    file[..4].copy_from_slice(b"GGML");
    assert!(gguf_message(parse(&file)).contains("not a GGUF file"));
    let mut file = small_file();
    file[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(gguf_message(parse(&file)).contains("version 1"));
    file[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(gguf_message(parse(&file)).contains("big-endian"));
    assert!(!gguf::is_gguf(b"GGML") && gguf::is_gguf(&small_file()));
}

#[test]
fn rejects_truncated_files() {
    let file = small_file();
    let header = parse(&file).unwrap();
    // Cut inside the header: the parser says which bytes it lacked.
    for cut in [2, 20, 60, header.data_start as usize - 40] {
        let message = gguf_message(parse(&file[..cut]));
        assert!(message.contains("truncated") && message.contains(&format!("{cut}-byte file")), "{message}");
    }
    // Cut inside the data: the tensor whose bytes are missing is named.
    let b = header.tensor("b.weight").unwrap();
    let message = gguf_message(parse(&file[..b.end as usize - 1]));
    assert!(message.contains("'b.weight'") && message.contains("beyond the end"), "{message}");
    // A prefix of a complete file asks for more bytes instead.
    assert_eq!(parse_header(FILE, &file[..30], file.len() as u64).unwrap(), Parsed::NeedBytes(32));
    // Reading it through a Source reports the file by its description.
    let mut source = MemorySource::default();
    source.insert(FILE, file[..100].to_vec());
    let err = pollster::block_on(read_header(&source, FILE)).unwrap_err();
    assert!(matches!(&err, Error::Gguf { path, .. } if path == "memory:model.gguf"), "{err:?}");
}

#[test]
fn rejects_corrupt_counts_and_offsets() {
    let file = small_file();
    let mut bad = file.clone();
    bad[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(gguf_message(parse(&bad)).contains("tensor count"));
    // The first metadata key's length.
    let mut bad = file.clone();
    bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(gguf_message(parse(&bad)).contains("runs past the end"));
    // An offset that is not aligned, and one beyond the file.
    // b.weight's info: name, n_dims (u32), 2 dims (u64), type (u32), then its offset (u64).
    let header = parse(&file).unwrap();
    let name_at = file.windows(8).position(|w| w == b"b.weight").unwrap();
    let offset_pos = name_at + 8 + 4 + 16 + 4;
    let offset = header.tensors[1].start - header.data_start;
    assert_eq!(file[offset_pos..offset_pos + 8], offset.to_le_bytes());
    let mut bad = file.clone();
    bad[offset_pos..offset_pos + 8].copy_from_slice(&(offset + 4).to_le_bytes());
    assert!(gguf_message(parse(&bad)).contains("not a multiple of the alignment"));
    bad[offset_pos..offset_pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(gguf_message(parse(&bad)).contains("'b.weight'"));
    // A metadata array of more values than a header may hold (each 32 bytes parsed): refused
    // after at most MAX_METADATA_VALUES of them, whatever the file's size.
    let n = gguf::MAX_METADATA_VALUES + 1;
    let mut huge = [&b"GGUF"[..], &3u32.to_le_bytes(), &0u64.to_le_bytes(), &1u64.to_le_bytes()].concat();
    huge.extend((4u64).to_le_bytes());
    huge.extend(b"huge");
    huge.extend(9u32.to_le_bytes());
    huge.extend(0u32.to_le_bytes());
    huge.extend(n.to_le_bytes());
    huge.resize(huge.len() + n as usize, 7);
    let message = gguf_message(parse(&huge));
    assert!(message.contains("'huge'") && message.contains("more than 1048576 values"), "{message}");
    // Duplicate names.
    let mut writer = GgufWriter::new();
    writer.tensor("same", &[32], GgmlType::F16, &[0.0; 32]).unwrap();
    writer.tensor("same", &[32], GgmlType::F16, &[0.0; 32]).unwrap();
    assert!(gguf_message(parse(&writer.to_bytes())).contains("'same' appears twice"));
}

#[test]
fn unsupported_types_name_tensor_and_type() {
    for (type_id, type_name) in [(9, "Q8_1"), (23, "IQ4_XS"), (16, "IQ2_XXS"), (99, "unknown type 99")] {
        let mut writer = GgufWriter::new();
        writer.tensor("fine", &[32], GgmlType::F32, &[1.0; 32]).unwrap();
        writer.raw_tensor("model.diffusion_model.out.2.weight", &[4, 256], type_id, vec![0; 4 * 144]);
        match parse(&writer.to_bytes()) {
            Err(Error::Tensor { path, tensor, message }) => {
                assert_eq!((path.as_str(), tensor.as_str()), (FILE, "model.diffusion_model.out.2.weight"));
                assert!(message.contains(type_name) && message.contains("not supported") && message.contains("Q8_0"), "{message}");
            }
            other => panic!("type {type_id}: expected a tensor error, got {other:?}"),
        }
    }
}

#[test]
fn rows_must_be_whole_blocks() {
    // ggml requires ne[0] (torch's last dim) to be a multiple of the block.
    for ggml_type in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1] {
        let mut writer = GgufWriter::new();
        // 48 values per row, written as 3 whole blocks' bytes of a [2, 48] tensor.
        writer.raw_tensor("w", &[2, 48], ggml_type.id(), vec![0; 3 * ggml_type.block_bytes()]);
        let message = gguf_message(parse(&writer.to_bytes()));
        assert!(message.contains("'w'") && message.contains("rows of 48 values") && message.contains("32-value blocks"), "{message}");
        let err = GgufWriter::new().tensor("w", &[2, 48], ggml_type, &[0.0; 96]).unwrap_err();
        assert!(matches!(&err, Error::InvalidParameter(m) if m.contains("'w'")), "{err:?}");
    }
    // The K-quants' blocks are 256 values.
    let mut writer = GgufWriter::new();
    writer.raw_tensor("k", &[2, 288], GgmlType::Q4_K.id(), vec![0; 3 * GgmlType::Q4_K.block_bytes()]);
    let message = gguf_message(parse(&writer.to_bytes()));
    assert!(message.contains("'k'") && message.contains("rows of 288 values") && message.contains("256-value blocks"), "{message}");
    // Float types have no blocks.
    let mut writer = GgufWriter::new();
    writer.tensor("odd", &[3, 5], GgmlType::F16, &[0.25; 15]).unwrap();
    let file = writer.to_bytes();
    let header = parse(&file).unwrap();
    assert_eq!(repack(&header.tensors[0], bytes_of(&file, &header, "odd")).unwrap(), Repacked::Dense(vec![0.25; 15]));
    // A short byte slice is refused, naming the tensor.
    let err = repack(&header.tensors[0], &[0; 4]).unwrap_err();
    assert!(matches!(&err, Error::InvalidParameter(m) if m.contains("'odd'") && m.contains("got 4 bytes, expected 30")), "{err:?}");
}

#[test]
fn type_names_parse() {
    for t in GgmlType::ALL {
        assert_eq!(t.name().to_lowercase().parse::<GgmlType>().unwrap(), t);
        assert_eq!(GgmlType::from_id(t.id()), Some(t));
    }
    assert_eq!(gguf::ggml_type_name(12), "Q4_K");
    assert_eq!("q4_k".parse::<GgmlType>().unwrap(), GgmlType::Q4_K);
    assert!("iq4_nl".parse::<GgmlType>().is_err());
}

/// A 1-D tensor of blocks (a [32] Q8_0 bias is one 34-byte block) is read whole, not as 32
/// one-byte rows: it used to read as 32 bytes, no whole block, and so no values at all.
#[test]
fn one_dimensional_block_tensors_read_whole() {
    let mut writer = GgufWriter::new();
    let (q8, q4k) = (test_values(32, 3), test_values(256, 4));
    writer.tensor("bias", &[32], GgmlType::Q8_0, &q8).unwrap();
    writer.tensor("norm", &[256], GgmlType::Q4_K, &q4k).unwrap();
    let file = writer.to_bytes();
    let header = parse(&file).unwrap();
    let mut source = MemorySource::default();
    source.insert(FILE, file.clone());
    let entries = header.tensors.iter().cloned().map(|t| Entry::gguf(0, t));
    let tensors = FileTensors::new(SharedSource::new(source), vec![FILE.into()], entries);
    for (name, n) in [("bias", 32), ("norm", 256)] {
        let got = pollster::block_on(tensors.host(name, &[n])).unwrap();
        let t = header.tensor(name).unwrap();
        let want = dequantize(t.ggml_type, &file[t.start as usize..t.end as usize]);
        assert_eq!((got.len(), bits(&got)), (n, bits(&want)), "{name}");
    }
}
