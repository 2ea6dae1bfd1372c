//! Tensor operations: shape checks and launch parameters for the WGSL kernels in `shaders/`.
//! Each op allocates its output; layouts are row-major, images NCHW, sequences [batch, tokens, width].

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use bytemuck::Zeroable;
use strum::EnumString;

use crate::error::{Error, Result};
use crate::gpu::{kernel_ids, kernel_params, shader, DType, Gpu, Shader, Tensor};
use crate::quant::Weight;

pub use crate::ops_gemm::Addend;

// The kernel families: each one's parameters, declared once for Rust and WGSL (see
// `kernel_params!`), and its shader.

kernel_params! { struct AttentionParams { lq: u32, lk: u32, heads: u32, width: u32, causal: u32, scale: f32, _p0: u32, _p1: u32 } }
const ATTENTION: Shader<AttentionParams> = shader!("attention");

kernel_params! { struct SoftmaxParams { rows: u32, cols: u32, scale: f32, _p0: u32 } }
const SOFTMAX: Shader<SoftmaxParams> = shader!("softmax");

kernel_params! { struct NormParams { rows: u32, cols: u32, eps: f32, _p0: u32 } }
const NORM: Shader<NormParams> = shader!("norm");

kernel_params! {
    /// Shared by both kernels of a group norm (each reads its own fields).
    struct GroupNormParams { groups: u32, channels: u32, h: u32, w: u32, y0: u32, y1: u32, x0: u32, x1: u32, chunks: u32, stride: u32, slot0: u32, silu: u32, eps: f32, _p0: u32, _p1: u32, _p2: u32 }
}
const GROUP_NORM: Shader<GroupNormParams> = shader!("group_norm");

kernel_params! {
    /// `op`: an `Activation` for `unary`, 1 for exp in `affine`.
    struct ActivationParams { n: u32, op: u32, _p0: u32, _p1: u32, scale: f32, shift: f32, lo: f32, hi: f32 }
}
const ACTIVATION: Shader<ActivationParams> = shader!("activation", Activation::KERNEL_IDS);

kernel_params! { struct ElementwiseParams { n: u32, op: u32, b_inner: u32, b_len: u32, alpha: f32, beta: f32, a_width: u32, b_width: u32 } }
const ELEMENTWISE: Shader<ElementwiseParams> = shader!("elementwise", BinaryOp::KERNEL_IDS);

kernel_params! { struct ResampleParams { n: u32, h: u32, w: u32, oh: u32, ow: u32, scale_y: f32, scale_x: f32, _p0: u32 } }
const RESAMPLE: Shader<ResampleParams> = shader!("resample");

kernel_params! { struct EmbeddingParams { n: u32, dim: u32, row0: u32, rows: u32 } }
const EMBEDDING: Shader<EmbeddingParams> = shader!("embedding");

kernel_params! { struct TimestepParams { n: u32, dim: u32, flip: u32, shift: f32, log_period: f32, scale: f32, _p0: u32, _p1: u32 } }
const TIMESTEP: Shader<TimestepParams> = shader!("timestep");

kernel_params! { struct FillParams { n: u32, seed: u32, center: f32, scale: f32, constant: u32, use_constant: u32, _p0: u32, _p1: u32 } }
const FILL: Shader<FillParams> = shader!("fill");

kernel_params! { struct TileParams { n: u32, h: u32, w: u32, th: u32, tw: u32, y0: u32, x0: u32, skip_y: u32, ramp_y: u32, skip_x: u32, ramp_x: u32, _p0: u32 } }
const TILE: Shader<TileParams> = shader!("tile");

kernel_params! { struct CastParams { n: u32, _p0: u32, _p1: u32, _p2: u32 } }
const CAST: Shader<CastParams> = shader!("cast");

kernel_ids! {
    /// A pointwise activation (activation.wgsl's OP_*).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, EnumString)]
    #[strum(serialize_all = "snake_case")]
    pub enum Activation as "OP" {
        #[strum(serialize = "silu", serialize = "swish")]
        Silu = 0,
        Gelu = 1,
        QuickGelu = 2,
        Relu = 3,
    }
}

kernel_ids! {
    /// elementwise.wgsl's OP_*.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum BinaryOp as "OP" {
        Add = 0,
        Mul = 1,
    }
}

impl Activation {
    /// From a transformers / diffusers `hidden_act` / `act_fn` string.
    pub fn from_name(name: &str) -> Option<Activation> {
        name.parse().ok()
    }
}

/// Workgroup memory the attention kernel's key and value tiles may use.
const ATTENTION_TILE_BYTES: usize = 16384;
/// Widest head the flash kernel takes: each invocation holds a query row and an output row of
/// this many f32s in registers.
const FLASH_MAX_HEAD_DIM: usize = 128;

/// The prelude of shaders/attention.wgsl for head size d, bkv keys per tile and ch keys per
/// rescale: its constants and the per-row code, unrolled over the row's vec4s (see the shader).
fn flash_prelude(d: usize, bkv: usize, ch: usize) -> String {
    let d4 = d.div_ceil(4);
    let each = |f: &dyn Fn(usize) -> String| (0..d4).map(f).collect::<String>();
    let mut s = format!("const D: u32 = {d}u;\nconst D4: u32 = {d4}u;\nconst BKV: u32 = {bkv}u;\nconst CH: u32 = {ch}u;\n");
    s += &each(&|c| format!("var<private> q_{c}: vec4<f32>;\nvar<private> o_{c}: vec4<f32>;\n"));
    s += &format!("fn load_query(base: u32) {{\n{}}}\n", each(&|c| format!("    q_{c} = q4(base, {c}u) * p.scale;\n")));
    s += &format!(
        "fn dot_query(row: u32) -> f32 {{\n    let t = row * D4;\n    var acc = vec4<f32>(0.0);\n{}    return acc.x + acc.y + acc.z + acc.w;\n}}\n",
        each(&|c| format!("    acc = fma(q_{c}, ks[t + {c}u], acc);\n"))
    );
    s += &format!("fn rescale(f: f32) {{\n{}}}\n", each(&|c| format!("    o_{c} = o_{c} * f;\n")));
    s += &format!(
        "fn accumulate(pj: f32, row: u32) {{\n    let t = row * D4;\n{}}}\n",
        each(&|c| format!("    o_{c} = fma(vec4<f32>(pj), vs[t + {c}u], o_{c});\n"))
    );
    s += &format!("fn store_output(base: u32, l: f32) {{\n{}}}\n", each(&|c| format!("    store4(base, {c}u, o_{c} / l);\n")));
    let keys = |f: &dyn Fn(usize) -> String| (0..ch).map(f).collect::<String>();
    s += "fn attend_chunk(row0: u32, key0: u32, qi: u32) {\n";
    s += &keys(&|j| format!("    let s{j} = score(row0 + {j}u, key0 + {j}u, qi);\n"));
    s += &format!("    let top = {};\n", (1..ch).fold("s0".to_string(), |e, j| format!("max({e}, s{j})")));
    s += "    if (top == MASKED) {\n        return;\n    }\n";
    s += "    let m_new = max(m_run, top);\n    let correction = exp(m_run - m_new);\n    l_run = l_run * correction;\n    rescale(correction);\n";
    s += &keys(&|j| format!("    let p{j} = weight(s{j}, m_new);\n    l_run = l_run + p{j};\n    accumulate(p{j}, row0 + {j}u);\n"));
    s + "    m_run = m_new;\n}\n"
}

/// Workgroups per normalised set of a group norm: about 16K elements each, at most 256.
fn group_chunks(set_len: usize) -> usize {
    set_len.div_ceil(1 << 14).clamp(1, 256)
}

fn bad(msg: String) -> Error {
    Error::InvalidParameter(msg)
}

fn u(x: usize) -> u32 {
    x as u32
}

impl Gpu {
    /// The float type an op computes in and stores its output as: that of its inputs, which must
    /// all have it (f16 only where the adapter has shader-f16). Each input comes with its name
    /// for errors.
    pub(crate) fn float_dtype(&self, op: &str, inputs: &[(&Tensor, &str)]) -> Result<DType> {
        let &(first, first_name) = inputs.first().expect("an op has inputs");
        let dtype = first.dtype();
        if dtype == DType::U32 || (dtype == DType::F16 && !self.has_shader_f16) {
            let allowed = if self.has_shader_f16 { "f32 or f16" } else { "f32 (this adapter has no shader-f16)" };
            return Err(bad(format!("{op}: {first_name} is {dtype:?}; expected {allowed}")));
        }
        if let Some((t, name)) = inputs.iter().find(|(t, _)| t.dtype() != dtype) {
            return Err(bad(format!("{op}: {name} is {:?} but {first_name} is {dtype:?}; an op's inputs share one float type (cast first)", t.dtype())));
        }
        Ok(dtype)
    }

    /// x converted to float type `dtype` (the same tensor when it has it already): f16 <-> f32.
    /// f16 -> f32 is exact; f32 -> f16 rounds as the device converts (values beyond ±65504 do
    /// not survive it).
    pub fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let from = self.float_dtype("cast", &[(x, "input")])?;
        if from == dtype {
            return Ok(x.clone());
        }
        if dtype == DType::U32 || !self.has_shader_f16 {
            return Err(bad(format!("cast of a {from:?} tensor to {dtype:?}: only f16 <-> f32, on an adapter with shader-f16")));
        }
        let y = self.empty_as(x.shape(), dtype)?;
        // The kernel is specialised for the f16 side (T = f16); `defines` orient it.
        let defines = if from == DType::F16 { "alias SRC = T;\nalias DST = f32;\n" } else { "alias SRC = f32;\nalias DST = T;\n" };
        self.dispatch_with(&CAST, "convert", DType::F16, defines, &CastParams { n: u(x.len()), ..Zeroable::zeroed() }, &[x, &y], Gpu::grid(x.len(), 256)?)?;
        Ok(y)
    }

    /// Scaled dot-product attention over [batch, tokens, heads * head_dim] tensors (the layout of
    /// diffusers' and transformers' projections, so no transposes are needed), as flash attention:
    /// memory stays linear in the token count.
    pub fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
        let (&[bq, lq, width], &[bk, lk, kw], vs) = (q.shape(), k.shape(), v.shape()) else {
            return Err(bad(format!("attention: expected [batch, tokens, width], got q {:?} k {:?}", q.shape(), k.shape())));
        };
        if bq != bk || kw != width || vs != k.shape() || heads == 0 || width % heads != 0 || lk == 0 {
            return Err(bad(format!(
                "attention: q {:?}, k {:?}, v {:?} with {heads} heads do not fit together",
                q.shape(),
                k.shape(),
                vs
            )));
        }
        if causal && lq != lk {
            return Err(bad(format!("attention: a causal mask needs as many queries as keys ({lq} vs {lk})")));
        }
        let dtype = self.float_dtype("attention", &[(q, "query"), (k, "key"), (v, "value")])?;
        let d = width / heads;
        if heads == 1 && d > FLASH_MAX_HEAD_DIM && !causal {
            return self.attention_chunked(q, k, v);
        }
        let d4 = d.div_ceil(4);
        // Keys per tile: K and V tiles (f32 vec4s) fill at most the 16 KiB every adapter offers.
        let bkv = (ATTENTION_TILE_BYTES / (32 * d4)).clamp(1, 64);
        let bkv = 1 << bkv.ilog2();
        thread_local! {
            static PRELUDES: RefCell<HashMap<(usize, usize), Rc<str>>> = RefCell::default();
        }
        let defines = PRELUDES.with(|p| p.borrow_mut().entry((d, bkv)).or_insert_with(|| flash_prelude(d, bkv, bkv.min(8)).into()).clone());
        let out = self.empty_as(&[bq, lq, width], dtype)?;
        let scale = 1.0 / (d as f32).sqrt();
        let params = AttentionParams { lq: u(lq), lk: u(lk), heads: u(heads), width: u(width), causal: causal as u32, scale, ..Zeroable::zeroed() };
        self.dispatch_with(&ATTENTION, "attention", dtype, &defines, &params, &[q, k, v, &out], [u(lq.div_ceil(64)), u(bq * heads), 1])?;
        Ok(out)
    }

    /// Single-head attention in chunks of queries through the GEMM kernel: scores [chunk, keys]
    /// (at most 256 MiB and one binding), row softmax, times V. For heads wider than
    /// `FLASH_MAX_HEAD_DIM` (the VAE's 512), whose query and accumulator rows would not stay in
    /// registers; memory stays bounded by one chunk of scores.
    fn attention_chunked(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (&[batch, lq, d], lk) = (q.shape(), k.shape()[1]) else { unreachable!("checked by attention") };
        let dtype = q.dtype();
        let rows = ((self.max_binding_bytes().min(256 << 20) as usize / (lk * dtype.size())).max(1)).min(lq);
        let mut items = Vec::with_capacity(batch);
        for b in 0..batch {
            let (qb, kb) = (self.narrow(q, b, 1)?.reshape(&[lq, d])?, self.narrow(k, b, 1)?.reshape(&[lk, d])?);
            let vt = Weight::Dense(self.transpose(&self.narrow(v, b, 1)?.reshape(&[lk, d])?)?);
            let (keys, out) = (Weight::Dense(kb), self.empty_as(&[lq, d], dtype)?);
            for r0 in (0..lq).step_by(rows) {
                let n = rows.min(lq - r0);
                let scores = self.linear(&self.crop(&qb, r0, 0, n, d)?, &keys, None)?;
                let params = SoftmaxParams { rows: u(n), cols: u(lk), scale: 1.0 / (d as f32).sqrt(), ..Zeroable::zeroed() };
                self.dispatch(&SOFTMAX, "softmax", dtype, &params, &[&scores], Gpu::grid(n, 1)?)?;
                self.paste(&out, &self.linear(&scores, &vt, None)?, r0, 0, [(0, 0); 2])?;
            }
            items.push(out.reshape(&[1, lq, d])?);
        }
        items.into_iter().try_fold(None, |acc: Option<Tensor>, item| match acc {
            None => Ok(Some(item)),
            Some(acc) => self.concat(&acc, &item, 0).map(Some),
        }).map(|t| t.expect("batch > 0"))
    }

    /// Layer norm over the last dimension.
    pub fn layer_norm(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        let cols = *x.shape().last().ok_or_else(|| bad("layer_norm: scalar input".into()))?;
        if gamma.shape() != [cols] || beta.shape() != [cols] {
            return Err(bad(format!("layer_norm: input {:?}, weight {:?}, bias {:?}", x.shape(), gamma.shape(), beta.shape())));
        }
        let dtype = self.float_dtype("layer_norm", &[(x, "input"), (gamma, "weight"), (beta, "bias")])?;
        let rows = x.len() / cols;
        let y = self.empty_as(x.shape(), dtype)?;
        let params = NormParams { rows: u(rows), cols: u(cols), eps, ..Zeroable::zeroed() };
        self.dispatch(&NORM, "layer_norm", dtype, &params, &[x, gamma, beta, &y], Gpu::grid(rows, 1)?)?;
        Ok(y)
    }

    /// Group norm over x [batch, channels, ...spatial] with its own statistics, optionally
    /// followed by SiLU.
    pub fn group_norm(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool) -> Result<Tensor> {
        let (batch, _, h, w) = self.group_dims(x, groups, gamma, beta)?;
        let chunks = group_chunks(x.len() / (batch * groups));
        let partials = self.empty_as(&[batch * groups, chunks, 4], DType::F32)?;
        self.group_partials(x, groups, [0, h, 0, w], &partials, 0, chunks)?;
        self.group_norm_with(x, groups, gamma, beta, eps, silu, &partials)
    }

    /// Records the statistics (count, mean, M2) of rows y0..y1, cols x0..x1 of x [batch,
    /// channels, h, w] per (batch, group) into `chunks` slots from `slot0` of `partials`
    /// [batch · groups, slots, 4] (f32).
    pub(crate) fn group_partials(&self, x: &Tensor, groups: usize, [y0, y1, x0, x1]: [usize; 4], partials: &Tensor, slot0: usize, chunks: usize) -> Result<()> {
        let dtype = self.float_dtype("group statistics", &[(x, "input")])?;
        let (batch, channels, h, w) = match x.shape() {
            [b, c, h, w] => (*b, *c, *h, *w),
            [b, c, rest @ ..] => (*b, *c, 1, rest.iter().product()),
            s => return Err(bad(format!("group statistics: expected [batch, channels, ...], got {s:?}"))),
        };
        if groups == 0 || channels % groups != 0 {
            return Err(bad(format!("group statistics: {groups} groups over {:?}", x.shape())));
        }
        let slots = partials.shape().get(1).copied().unwrap_or(0);
        if y0 >= y1 || y1 > h || x0 >= x1 || x1 > w || partials.shape() != [batch * groups, slots, 4] || slot0 + chunks > slots {
            return Err(bad(format!("group statistics of rows {y0}..{y1}, cols {x0}..{x1} of {:?} into slots {slot0}.. of {:?}", x.shape(), partials.shape())));
        }
        let params = GroupNormParams {
            groups: u(groups), channels: u(channels), h: u(h), w: u(w),
            y0: u(y0), y1: u(y1), x0: u(x0), x1: u(x1),
            chunks: u(chunks), stride: u(slots), slot0: u(slot0),
            ..Zeroable::zeroed()
        };
        self.dispatch(&GROUP_NORM, "group_partials", dtype, &params, &[x, partials], [u(chunks), u(batch * groups), 1])
    }

    /// Group norm of x with the statistics merged from every slot of `partials` (see
    /// `group_partials`), optionally followed by SiLU.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn group_norm_with(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool, partials: &Tensor) -> Result<Tensor> {
        let (batch, channels, h, w) = self.group_dims(x, groups, gamma, beta)?;
        let dtype = x.dtype();
        let slots = partials.shape().get(1).copied().unwrap_or(0);
        if partials.shape() != [batch * groups, slots, 4] {
            return Err(bad(format!("group norm of {:?} with statistics {:?}", x.shape(), partials.shape())));
        }
        let chunks = group_chunks(x.len() / (batch * groups));
        let y = self.empty_as(x.shape(), dtype)?;
        let params = GroupNormParams {
            groups: u(groups), channels: u(channels), h: u(h), w: u(w),
            chunks: u(chunks), stride: u(slots), silu: silu as u32, eps,
            ..Zeroable::zeroed()
        };
        self.dispatch(&GROUP_NORM, "group_apply", dtype, &params, &[x, partials, gamma, beta, &y], [u(chunks), u(batch * groups), 1])?;
        Ok(y)
    }

    /// (batch, channels, h, w) of a group norm's input, checked with its parameters (any spatial
    /// rank: the trailing axes are taken as one row).
    fn group_dims(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor) -> Result<(usize, usize, usize, usize)> {
        self.float_dtype("group_norm", &[(x, "input"), (gamma, "weight"), (beta, "bias")])?;
        let (batch, channels) = match x.shape() {
            [b, c, _, ..] => (*b, *c),
            s => return Err(bad(format!("group_norm: expected [batch, channels, ...], got {s:?}"))),
        };
        if groups == 0 || channels % groups != 0 || gamma.shape() != [channels] || beta.shape() != [channels] || x.is_empty() {
            return Err(bad(format!(
                "group_norm: {groups} groups over {:?} with weight {:?}, bias {:?}",
                x.shape(),
                gamma.shape(),
                beta.shape()
            )));
        }
        let (h, w) = match x.shape() {
            [_, _, h, w] => (*h, *w),
            s => (1, s[2..].iter().product()),
        };
        Ok((batch, channels, h, w))
    }

    pub fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let dtype = self.float_dtype("activation", &[(x, "input")])?;
        let y = self.empty_as(x.shape(), dtype)?;
        self.dispatch(&ACTIVATION, "unary", dtype, &ActivationParams { n: u(x.len()), op: act as u32, ..Zeroable::zeroed() }, &[x, &y], Gpu::grid(x.len(), 256)?)?;
        Ok(y)
    }

    /// a + b or a * b where b repeats: b index = (i / b_inner) % b.len() (see elementwise.wgsl).
    fn binary(&self, op: BinaryOp, a: &Tensor, b: &Tensor, b_inner: usize) -> Result<Tensor> {
        if b.is_empty() || b_inner == 0 || !a.len().is_multiple_of(b_inner * b.len()) {
            return Err(bad(format!("cannot broadcast {:?} over {:?}", b.shape(), a.shape())));
        }
        let dtype = self.float_dtype(if op == BinaryOp::Add { "add" } else { "mul" }, &[(a, "a"), (b, "b")])?;
        let y = self.empty_as(a.shape(), dtype)?;
        let params = ElementwiseParams { n: u(a.len()), op: op as u32, b_inner: u(b_inner), b_len: u(b.len()), ..Zeroable::zeroed() };
        self.dispatch(&ELEMENTWISE, "binary", dtype, &params, &[a, b, &y], Gpu::grid(a.len(), 256)?)?;
        Ok(y)
    }

    /// a + b for equal shapes, or b broadcast over a's leading axes (b's shape a suffix of a's).
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.check_suffix(a, b, "add")?;
        self.binary(BinaryOp::Add, a, b, 1)
    }

    pub fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.check_suffix(a, b, "mul")?;
        self.binary(BinaryOp::Mul, a, b, 1)
    }

    fn check_suffix(&self, a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        if !a.shape().ends_with(b.shape()) {
            return Err(bad(format!("{what}: {:?} does not broadcast over {:?}", b.shape(), a.shape())));
        }
        Ok(())
    }

    /// alpha * a + beta * b, same shapes.
    pub fn axpby(&self, alpha: f32, a: &Tensor, beta: f32, b: &Tensor) -> Result<Tensor> {
        if a.shape() != b.shape() {
            return Err(bad(format!("axpby: {:?} vs {:?}", a.shape(), b.shape())));
        }
        let dtype = self.float_dtype("axpby", &[(a, "a"), (b, "b")])?;
        let y = self.empty_as(a.shape(), dtype)?;
        let params = ElementwiseParams { n: u(a.len()), b_inner: 1, b_len: 1, alpha, beta, ..Zeroable::zeroed() };
        self.dispatch(&ELEMENTWISE, "axpby", dtype, &params, &[a, b, &y], Gpu::grid(a.len(), 256)?)?;
        Ok(y)
    }

    pub fn scale(&self, a: &Tensor, s: f32) -> Result<Tensor> {
        self.axpby(s, a, 0.0, a)
    }

    /// Concatenation along `axis`; all other dimensions must match.
    pub fn concat(&self, a: &Tensor, b: &Tensor, axis: usize) -> Result<Tensor> {
        let (sa, sb) = (a.shape(), b.shape());
        if sa.len() != sb.len() || axis >= sa.len() || (0..sa.len()).any(|i| i != axis && sa[i] != sb[i]) {
            return Err(bad(format!("concat on axis {axis}: {sa:?} and {sb:?}")));
        }
        let dtype = self.float_dtype("concat", &[(a, "a"), (b, "b")])?;
        let inner: usize = sa[axis + 1..].iter().product();
        let mut shape = sa.to_vec();
        shape[axis] += sb[axis];
        let y = self.empty_as(&shape, dtype)?;
        let params = ElementwiseParams { n: u(y.len()), b_inner: 1, b_len: 1, a_width: u(sa[axis] * inner), b_width: u(sb[axis] * inner), ..Zeroable::zeroed() };
        self.dispatch(&ELEMENTWISE, "concat", dtype, &params, &[a, b, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    /// Rows of an embedding table split in row chunks (each within one binding): ids [n] -> [n, dim].
    pub fn embedding(&self, ids: &Tensor, chunks: &[Tensor]) -> Result<Tensor> {
        let dim = match chunks.first().map(|c| c.shape()) {
            Some(&[_, d]) => d,
            _ => return Err(bad("embedding: table must be 2-D row chunks".into())),
        };
        if ids.dtype() != DType::U32 {
            return Err(bad("embedding: ids must be u32".into()));
        }
        let dtype = self.float_dtype("embedding", &chunks.iter().map(|c| (c, "table chunk")).collect::<Vec<_>>())?;
        let y = self.zeros_as(&[ids.len(), dim], dtype)?;
        let mut row0 = 0;
        for chunk in chunks {
            let rows = chunk.shape()[0];
            if chunk.shape() != [rows, dim] {
                return Err(bad(format!("embedding: chunk {:?} does not have width {dim}", chunk.shape())));
            }
            let params = EmbeddingParams { n: u(ids.len()), dim: u(dim), row0: u(row0), rows: u(rows) };
            self.dispatch(&EMBEDDING, "gather", dtype, &params, &[ids, chunk, &y], Gpu::grid(y.len(), 256)?)?;
            row0 += rows;
        }
        Ok(y)
    }

    /// Nearest-neighbour resize of [.., h, w] to [.., out_h, out_w] as torch's
    /// F.interpolate(mode="nearest"): ×2 in general, the skip's size in a UNet whose latent is not
    /// a multiple of 2^levels (diffusers' forward_upsample_size).
    pub fn upsample_nearest(&self, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
        let s = x.shape();
        if s.len() < 2 || out_h == 0 || out_w == 0 || s.contains(&0) {
            return Err(bad(format!("upsample: [.., h, w] {s:?} to {out_h}x{out_w}")));
        }
        let dtype = self.float_dtype("upsample", &[(x, "input")])?;
        let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
        let mut shape = s.to_vec();
        let r = shape.len();
        (shape[r - 2], shape[r - 1]) = (out_h, out_w);
        let y = self.empty_as(&shape, dtype)?;
        let (scale_y, scale_x) = (h as f32 / out_h as f32, w as f32 / out_w as f32);
        let params = ResampleParams { n: u(y.len()), h: u(h), w: u(w), oh: u(out_h), ow: u(out_w), scale_y, scale_x, ..Zeroable::zeroed() };
        self.dispatch(&RESAMPLE, "upsample_nearest", dtype, &params, &[x, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    pub fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        if s.len() < 2 {
            return Err(bad(format!("upsample: expected [.., h, w], got {s:?}")));
        }
        self.upsample_nearest(x, 2 * s[s.len() - 2], 2 * s[s.len() - 1])
    }

    /// diffusers' get_timestep_embedding: timesteps [n] (f32) -> [n, dim] in the working float type.
    pub fn timestep_embedding(&self, t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f32, scale: f32, max_period: f32) -> Result<Tensor> {
        if t.dtype() != DType::F32 || t.shape().len() != 1 || dim < 2 {
            return Err(bad(format!("timestep_embedding: timesteps must be f32 [n], got {:?} {:?}, dim {dim}", t.dtype(), t.shape())));
        }
        let n = t.len();
        let y = self.empty(&[n, dim])?;
        let params = TimestepParams { n: u(n), dim: u(dim), flip: flip_sin_to_cos as u32, shift, log_period: max_period.ln(), scale, ..Zeroable::zeroed() };
        self.dispatch(&TIMESTEP, "timestep", self.dtype, &params, &[t, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    /// Swaps the last two axes: [.., rows, cols] -> [.., cols, rows]. Moves images between NCHW
    /// ([B, C, H*W]) and the token layout [B, H*W, C] of attention and linear projections.
    pub fn transpose(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = self.float_dtype("transpose", &[(x, "input")])?;
        let s = x.shape();
        if s.len() < 2 {
            return Err(bad(format!("transpose: expected [.., rows, cols], got {s:?}")));
        }
        let (rows, cols) = (s[s.len() - 2], s[s.len() - 1]);
        let mut shape = s.to_vec();
        let r = shape.len();
        shape.swap(r - 2, r - 1);
        let y = self.empty_as(&shape, dtype)?;
        self.dispatch(&RESAMPLE, "transpose", dtype, &ResampleParams { n: u(y.len()), h: u(rows), w: u(cols), ..Zeroable::zeroed() }, &[x, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    /// Pointwise clamp(f(scale * x + shift), lo, hi), f = exp when `exp` (else identity), computed
    /// in f32: e.g. diffusers' image post-processing (x / 2 + 0.5).clamp(0, 1) and a VAE
    /// posterior's clamped logvar and std = exp(logvar / 2). Use ±infinity for an open bound.
    pub fn affine(&self, x: &Tensor, scale: f32, shift: f32, exp: bool, (lo, hi): (f32, f32)) -> Result<Tensor> {
        let dtype = self.float_dtype("affine", &[(x, "input")])?;
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(bad(format!("affine: clamp bounds {lo}..{hi}")));
        }
        let y = self.empty_as(x.shape(), dtype)?;
        let params = ActivationParams { n: u(x.len()), op: exp as u32, scale, shift, lo, hi, ..Zeroable::zeroed() };
        self.dispatch(&ACTIVATION, "affine", dtype, &params, &[x, &y], Gpu::grid(x.len(), 256)?)?;
        Ok(y)
    }

    /// Pointwise bound · tanh(scale · x / bound), in f32: TAESD's latent clamp tanh(x / 3) · 3
    /// (bound 3) of latents divided by the VAE's scaling factor (scale 1 / scaling_factor).
    pub fn soft_clamp(&self, x: &Tensor, scale: f32, bound: f32) -> Result<Tensor> {
        let dtype = self.float_dtype("soft_clamp", &[(x, "input")])?;
        if !(bound.is_finite() && bound > 0.0 && scale.is_finite()) {
            return Err(bad(format!("soft_clamp: scale {scale}, bound {bound}")));
        }
        let y = self.empty_as(x.shape(), dtype)?;
        let params = ActivationParams { n: u(x.len()), scale, hi: bound, ..Zeroable::zeroed() };
        self.dispatch(&ACTIVATION, "soft_clamp", dtype, &params, &[x, &y], Gpu::grid(x.len(), 256)?)?;
        Ok(y)
    }

    /// Overwrites a float tensor with center + scale · uniform(-1, 1), drawn on the GPU from `seed`.
    pub fn fill_uniform(&self, t: &Tensor, seed: u32, center: f32, scale: f32) -> Result<()> {
        let dtype = self.float_dtype("fill_uniform", &[(t, "tensor")])?;
        let params = FillParams { n: u(t.len()), seed, center, scale, ..Zeroable::zeroed() };
        self.dispatch(&FILL, "fill_uniform", dtype, &params, &[t], Gpu::grid(t.len(), 256)?)
    }

    /// Overwrites a u32 tensor with random words from `seed`, or with `constant` everywhere.
    pub fn fill_words(&self, t: &Tensor, seed: u32, constant: Option<u32>) -> Result<()> {
        if t.dtype() != DType::U32 {
            return Err(bad(format!("fill_words: expected a u32 tensor, got {:?}", t.dtype())));
        }
        let params = FillParams { n: u(t.len()), seed, constant: constant.unwrap_or(0), use_constant: constant.is_some() as u32, ..Zeroable::zeroed() };
        self.dispatch(&FILL, "fill_words", DType::F32, &params, &[t], Gpu::grid(t.len(), 256)?)
    }

    /// The window [.., rows y0..y0 + th, cols x0..x0 + tw] of x [.., h, w].
    pub fn crop(&self, x: &Tensor, y0: usize, x0: usize, th: usize, tw: usize) -> Result<Tensor> {
        let (planes, h, w) = self.planes(x, "crop")?;
        let dtype = x.dtype();
        if th == 0 || tw == 0 || y0 + th > h || x0 + tw > w {
            return Err(bad(format!("crop: {th}x{tw} at ({y0}, {x0}) of {:?}", x.shape())));
        }
        let mut shape = x.shape().to_vec();
        let r = shape.len();
        (shape[r - 2], shape[r - 1]) = (th, tw);
        let y = self.empty_as(&shape, dtype)?;
        let params = TileParams { n: u(y.len()), h: u(h), w: u(w), th: u(th), tw: u(tw), y0: u(y0), x0: u(x0), ..Zeroable::zeroed() };
        self.dispatch(&TILE, "crop", dtype, &params, &[x, &y], Gpu::grid(planes * th * tw, 256)?)?;
        Ok(y)
    }

    /// Writes `tile` [.., th, tw] into `image` [.., h, w] at (y0, x0), blended with what `image`
    /// holds near the tile's top and left edges: (skip, ramp) per axis, the tile's weight 0 over
    /// the first `skip` rows (columns), then rising linearly to 1 over `ramp`.
    pub fn paste(&self, image: &Tensor, tile: &Tensor, y0: usize, x0: usize, blend: [(usize, usize); 2]) -> Result<()> {
        let (planes, h, w) = self.planes(image, "paste")?;
        let (tile_planes, th, tw) = self.planes(tile, "paste")?;
        let dtype = self.float_dtype("paste", &[(image, "image"), (tile, "tile")])?;
        let [(skip_y, ramp_y), (skip_x, ramp_x)] = blend;
        if tile_planes != planes || y0 + th > h || x0 + tw > w || skip_y + ramp_y > th || skip_x + ramp_x > tw {
            return Err(bad(format!("paste: {:?} at ({y0}, {x0}) into {:?}, blend {blend:?}", tile.shape(), image.shape())));
        }
        let params = TileParams {
            n: u(tile.len()), h: u(h), w: u(w), th: u(th), tw: u(tw), y0: u(y0), x0: u(x0),
            skip_y: u(skip_y), ramp_y: u(ramp_y), skip_x: u(skip_x), ramp_x: u(ramp_x),
            ..Zeroable::zeroed()
        };
        self.dispatch(&TILE, "paste", dtype, &params, &[tile, image], Gpu::grid(tile.len(), 256)?)
    }

    /// (planes, h, w) of a float tensor [.., h, w].
    fn planes(&self, x: &Tensor, what: &str) -> Result<(usize, usize, usize)> {
        self.float_dtype(what, &[(x, "input")])?;
        match x.shape() {
            [lead @ .., h, w] if *h > 0 && *w > 0 => Ok((lead.iter().product(), *h, *w)),
            s => Err(bad(format!("{what}: expected [.., h, w], got {s:?}"))),
        }
    }
}
