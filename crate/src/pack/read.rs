//! Reading a pack: [`open`] gives a [`ModelSource`] whose small files are served by their
//! original paths ([`PackFiles`], each file's sha256 checked as it is read) and whose tensors are
//! [`PackTensors`]: quantized entries as stored, dense ones as f16 / f32, only the segments of the
//! rows asked for read. Shards' sha256 are for the store to check: [`verify`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::rc::Rc;

use half::f16;
use sha2::{Digest, Sha256};

use super::manifest::{sha256_hex, Pack, PackTensor, Segment, Storage, MANIFEST};
use crate::error::{mib, Error, Result};
use crate::quant::QuantizedTensor;
use crate::weights::safetensors::Dtype;
use crate::weights::{checked, Encoding, Fetch, HostTensor, ModelSource, SharedSource, Source, TensorIndex, TensorInfo, TensorSource};

/// Bytes read at a time by [`verify`].
const VERIFY_CHUNK: u64 = 4 << 20;

/// The pack that `inner` holds as a model, with its validated manifest.
pub async fn open<'a>(inner: impl Source + 'a) -> Result<(ModelSource<'a>, Rc<Pack>)> {
    let inner = SharedSource::new(inner);
    let pack = Rc::new(Pack::load(&inner).await?);
    let files = SharedSource::new(PackFiles { inner: inner.clone(), pack: pack.clone() });
    let mut components: BTreeMap<String, Rc<dyn TensorSource + 'a>> = BTreeMap::new();
    for (component, entries) in &pack.components {
        let tensors = entries
            .iter()
            .map(|(name, &i)| {
                let t = &pack.manifest().tensors[i];
                let encoding = match t.storage.quant_format() {
                    Some(format) => Encoding::Quant(format),
                    None if t.storage == Storage::F16 => Encoding::Float(Dtype::F16),
                    None => Encoding::Float(Dtype::F32),
                };
                (name.clone(), (TensorInfo { shape: t.shape.clone(), encoding, bytes: t.bytes() }, i))
            })
            .collect();
        let source = PackTensors { inner: inner.clone(), pack: pack.clone(), component: component.clone(), tensors };
        components.insert(component.clone(), Rc::new(source));
    }
    let m = pack.manifest();
    let format = format!("model pack ({:?}, {}, {} shards, {})", m.model, m.quant.name(), m.shards.len(), mib(m.bytes()));
    Ok((ModelSource::indexed(files, components, format), pack))
}

/// A pack's small files by their original paths; `manifest.json` and `shards/*` pass through.
struct PackFiles<'a> {
    inner: SharedSource<'a>,
    pack: Rc<Pack>,
}

impl PackFiles<'_> {
    fn passthrough(path: &str) -> bool {
        path == MANIFEST || path.starts_with("shards/")
    }
}

impl Source for PackFiles<'_> {
    fn describe(&self, path: &str) -> String {
        if Self::passthrough(path) {
            self.inner.describe(path)
        } else {
            format!("{path} (in the pack {})", self.inner.describe(""))
        }
    }
    async fn exists(&self, path: &str) -> bool {
        if Self::passthrough(path) {
            self.inner.exists(path).await
        } else {
            self.pack.file(path).is_some()
        }
    }
    async fn len(&self, path: &str) -> Result<u64> {
        if Self::passthrough(path) {
            return self.inner.len(path).await;
        }
        self.pack.file(path).map(|f| f.bytes).ok_or_else(|| Error::Io { path: self.describe(path), message: "no such file in the pack".into() })
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        if Self::passthrough(path) {
            return self.inner.read_range(path, start, end).await;
        }
        let file = self.pack.file(path).ok_or_else(|| Error::Io { path: self.describe(path), message: "no such file in the pack".into() })?;
        if start > end || end > file.bytes {
            return Err(Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} out of range of {}", file.bytes) });
        }
        // Small files: read whole, so that the checksum can be verified.
        let bytes = self.pack.read_whole(&self.inner, &file.segments).await?;
        let sum = sha256_hex(&bytes);
        if sum != file.sha256 {
            return Err(Error::Io { path: self.describe(path), message: format!("sha256 {sum} does not match the manifest's {} (corrupt pack)", file.sha256) });
        }
        Ok(bytes[start as usize..end as usize].to_vec())
    }
}

/// One component's entries of a pack.
pub struct PackTensors<'a> {
    inner: SharedSource<'a>,
    pack: Rc<Pack>,
    component: String,
    /// name → (info, index in the manifest's tensors).
    tensors: TensorIndex<usize>,
}

impl PackTensors<'_> {
    /// Rows `rows` of a plane of `row_bytes` per row.
    async fn plane(&self, segments: &[Segment], row_bytes: u64, rows: &Range<usize>) -> Result<Vec<u8>> {
        self.pack.read_plane(&self.inner, segments, rows.start as u64 * row_bytes, rows.end as u64 * row_bytes).await
    }

    async fn read_entry(&self, t: &PackTensor, rows: Range<usize>) -> Result<HostTensor> {
        let total = t.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > total || (t.shape.len() < 2 && rows != (0..total)) {
            return Err(Error::Tensor { path: self.location(), tensor: t.name.clone(), message: format!("rows {rows:?} of shape {:?}", t.shape) });
        }
        let Some(format) = t.storage.quant_format() else {
            let (dtype, size) = if t.storage == Storage::F16 { (Dtype::F16, 2u64) } else { (Dtype::F32, 4) };
            let row_bytes = t.shape.iter().skip(1).try_fold(size, |n, &d| n.checked_mul(d as u64));
            let row_bytes = row_bytes.ok_or_else(|| Error::Tensor { path: self.location(), tensor: t.name.clone(), message: format!("shape {:?} is too large", t.shape) })?;
            return Ok(HostTensor::Float { dtype, bytes: self.plane(&t.data, row_bytes, &rows).await? });
        };
        let (cols, blocks) = (t.cols.unwrap_or(0), t.cols.unwrap_or(0).div_ceil(format.block_values()) as u64);
        let halves = |b: Vec<u8>| b.chunks_exact(2).map(|h| f16::from_le_bytes([h[0], h[1]])).collect::<Vec<_>>();
        let data = self.plane(&t.data, blocks * format.words_per_block() as u64 * 4, &rows).await?;
        let scales = match &t.scales {
            Some(s) => halves(self.plane(s, blocks * 2, &rows).await?),
            None => Vec::new(),
        };
        let mins = match &t.mins {
            Some(m) => halves(self.plane(m, blocks * 2, &rows).await?),
            None => Vec::new(),
        };
        Ok(HostTensor::Quant(QuantizedTensor { format, rows: rows.len(), cols, data: bytemuck::pod_collect_to_vec(&data), scales, mins }))
    }
}

impl TensorSource for PackTensors<'_> {
    fn location(&self) -> String {
        format!("{} ({})", self.pack.location, self.component)
    }
    fn names(&self) -> Vec<&str> {
        self.tensors.names()
    }
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.info(name)
    }
    fn read<'s>(&'s self, name: &'s str, shape: &'s [usize], rows: Range<usize>) -> Fetch<'s, HostTensor> {
        Box::pin(async move {
            checked(self, name, shape)?;
            self.read_entry(&self.pack.manifest().tensors[self.tensors[name]], rows).await
        })
    }
}

/// Checks every shard of the pack that `source` holds against the manifest's length and sha256,
/// reading [`VERIFY_CHUNK`] bytes at a time. The error names the first bad shard.
pub async fn verify(source: &impl Source) -> Result<()> {
    let pack = Pack::load(source).await?;
    for shard in &pack.manifest().shards {
        let mut hasher = Sha256::new();
        let mut pos = 0;
        while pos < shard.bytes {
            let end = (pos + VERIFY_CHUNK).min(shard.bytes);
            hasher.update(source.read_range(&shard.path, pos, end).await?);
            pos = end;
        }
        let sum = hex::encode(hasher.finalize());
        if sum != shard.sha256 {
            return Err(Error::Io {
                path: source.describe(&shard.path),
                message: format!("sha256 {sum} does not match the manifest's {} (corrupt shard)", shard.sha256),
            });
        }
    }
    Ok(())
}
