//! Tensor operations: shape checks and launch parameters for the WGSL kernels in `shaders/`.
//! Each op allocates its output; layouts are row-major, images NCHW, sequences [batch, tokens, width].

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Shader, Tensor};

macro_rules! shader {
    ($name:literal) => {
        Shader { name: $name, source: include_str!(concat!("../../shaders/", $name, ".wgsl")) }
    };
}

const MATMUL: Shader = shader!("matmul");
const ATTENTION: Shader = shader!("attention");
const NORM: Shader = shader!("norm");
const ACTIVATION: Shader = shader!("activation");
const ELEMENTWISE: Shader = shader!("elementwise");
const RESAMPLE: Shader = shader!("resample");
const EMBEDDING: Shader = shader!("embedding");
const TIMESTEP: Shader = shader!("timestep");
const CONV: Shader = shader!("conv");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu = 0,
    Gelu = 1,
    QuickGelu = 2,
}

impl Activation {
    /// From a transformers / diffusers `hidden_act` / `act_fn` string.
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            "quick_gelu" => Some(Activation::QuickGelu),
            _ => None,
        }
    }
}

/// Operand layout of one side of a batched strided matmul.
#[derive(Clone, Copy, Debug)]
struct Operand {
    /// Elements between consecutive rows.
    ld: usize,
    /// Elements between consecutive batch items, and between consecutive heads within one.
    batch: usize,
    head: usize,
}

fn bad(msg: String) -> Error {
    Error::InvalidParameter(msg)
}

fn u(x: usize) -> u32 {
    x as u32
}

impl Gpu {
    fn check_float(&self, t: &Tensor, what: &str) -> Result<()> {
        if t.dtype() != self.dtype {
            return Err(bad(format!("{what}: expected a {:?} tensor, got {:?}", self.dtype, t.dtype())));
        }
        Ok(())
    }

    /// Batched strided C = alpha * A·B (+ bias), batch z = (z / heads, z % heads).
    #[allow(clippy::too_many_arguments)]
    fn matmul_strided(
        &self,
        (m, n, k, batches, heads): (usize, usize, usize, usize, usize),
        a: (&Tensor, Operand),
        b: (&Tensor, Operand, bool),
        c: (&Tensor, Operand),
        alpha: f32,
        bias: Option<&Tensor>,
    ) -> Result<()> {
        let params = [
            u(m), u(n), u(k), u(heads),
            u(a.1.ld), u(b.1.ld), u(c.1.ld), b.2 as u32,
            u(a.1.batch), u(a.1.head), u(b.1.batch), u(b.1.head),
            u(c.1.batch), u(c.1.head), alpha.to_bits(), 0,
        ];
        let groups = [u(n.div_ceil(16)), u(m.div_ceil(16)), u(batches * heads)];
        match bias {
            Some(bias) => self.dispatch(&MATMUL, "linear", &params, &[a.0, b.0, c.0, bias], groups),
            None => self.dispatch(&MATMUL, "matmul", &params, &[a.0, b.0, c.0], groups),
        }
    }

    /// nn.Linear: x [.., k] · weight [n, k]ᵀ + bias [n] -> [.., n].
    pub fn linear(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.check_float(x, "linear input")?;
        let (&k, lead) = x.shape().split_last().ok_or_else(|| bad("linear: scalar input".into()))?;
        let &[n, wk] = weight.shape() else {
            return Err(bad(format!("linear: weight must be 2-D, got {:?}", weight.shape())));
        };
        if wk != k {
            return Err(bad(format!("linear: input {:?} does not match weight {:?}", x.shape(), weight.shape())));
        }
        if let Some(b) = bias {
            if b.shape() != [n] {
                return Err(bad(format!("linear: bias {:?} does not match weight {:?}", b.shape(), weight.shape())));
            }
        }
        let m: usize = lead.iter().product();
        let mut shape = lead.to_vec();
        shape.push(n);
        let y = self.empty(&shape)?;
        let flat = |ld| Operand { ld, batch: 0, head: 0 };
        self.matmul_strided((m, n, k, 1, 1), (x, flat(k)), (weight, flat(k), true), (&y, flat(n)), 1.0, bias)?;
        Ok(y)
    }

    /// Plain matrix product a [.., m, k] · b [k, n] -> [.., m, n] (b shared across the batch).
    pub fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (&k, lead) = a.shape().split_last().ok_or_else(|| bad("matmul: scalar input".into()))?;
        let &[bk, n] = b.shape() else {
            return Err(bad(format!("matmul: b must be 2-D, got {:?}", b.shape())));
        };
        if bk != k {
            return Err(bad(format!("matmul: {:?} · {:?}", a.shape(), b.shape())));
        }
        let m: usize = lead.iter().product();
        let mut shape = lead.to_vec();
        shape.push(n);
        let y = self.empty(&shape)?;
        let flat = |ld| Operand { ld, batch: 0, head: 0 };
        self.matmul_strided((m, n, k, 1, 1), (a, flat(k)), (b, flat(n), false), (&y, flat(n)), 1.0, None)?;
        Ok(y)
    }

    /// Scaled dot-product attention over [batch, tokens, heads * head_dim] tensors (the layout of
    /// diffusers' and transformers' projections, so no transposes are needed).
    pub fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
        let (&[bq, lq, width], &[bk, lk, kw], vs) = (q.shape(), k.shape(), v.shape()) else {
            return Err(bad(format!("attention: expected [batch, tokens, width], got q {:?} k {:?}", q.shape(), k.shape())));
        };
        if bq != bk || kw != width || vs != k.shape() || heads == 0 || width % heads != 0 {
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
        let d = width / heads;
        let scores = self.empty(&[bq * heads, lq, lk])?;
        let seq = |tokens: usize| Operand { ld: width, batch: tokens * width, head: d };
        let grid = Operand { ld: lk, batch: heads * lq * lk, head: lq * lk };
        let scale = 1.0 / (d as f32).sqrt();
        self.matmul_strided((lq, lk, d, bq, heads), (q, seq(lq)), (k, seq(lk), true), (&scores, grid), scale, None)?;
        self.softmax_rows(&scores, lq, causal)?;
        let out = self.empty(&[bq, lq, width])?;
        self.matmul_strided((lq, d, lk, bq, heads), (&scores, grid), (v, seq(lk), false), (&out, seq(lq)), 1.0, None)?;
        Ok(out)
    }

    /// In-place softmax over the last dimension; with `causal`, row r keeps keys j <= r % q_len.
    pub fn softmax_rows(&self, x: &Tensor, q_len: usize, causal: bool) -> Result<()> {
        let cols = *x.shape().last().ok_or_else(|| bad("softmax: scalar input".into()))?;
        let rows = x.len() / cols.max(1);
        self.dispatch(&ATTENTION, "softmax", &[u(rows), u(cols), causal as u32, u(q_len.max(1))], &[x], Gpu::grid(rows, 1)?)
    }

    /// Layer norm over the last dimension.
    pub fn layer_norm(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        let cols = *x.shape().last().ok_or_else(|| bad("layer_norm: scalar input".into()))?;
        if gamma.shape() != [cols] || beta.shape() != [cols] {
            return Err(bad(format!("layer_norm: input {:?}, weight {:?}, bias {:?}", x.shape(), gamma.shape(), beta.shape())));
        }
        let rows = x.len() / cols;
        let y = self.empty(x.shape())?;
        let params = [u(rows), u(cols), eps.to_bits(), 0, 0, 1, 1, 0];
        self.dispatch(&NORM, "layer_norm", &params, &[x, gamma, beta, &y], Gpu::grid(rows, 1)?)?;
        Ok(y)
    }

    /// Group norm over x [batch, channels, ...spatial], optionally followed by SiLU.
    pub fn group_norm(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f32, silu: bool) -> Result<Tensor> {
        let (batch, channels) = match x.shape() {
            [b, c, ..] => (*b, *c),
            s => return Err(bad(format!("group_norm: expected [batch, channels, ...], got {s:?}"))),
        };
        if groups == 0 || channels % groups != 0 || gamma.shape() != [channels] || beta.shape() != [channels] {
            return Err(bad(format!(
                "group_norm: {groups} groups over {:?} with weight {:?}, bias {:?}",
                x.shape(),
                gamma.shape(),
                beta.shape()
            )));
        }
        let hw = x.len() / (batch * channels);
        let sets = batch * groups;
        let y = self.empty(x.shape())?;
        let params = [u(sets), u(channels / groups * hw), eps.to_bits(), silu as u32, u(channels), u(groups), u(hw), 0];
        self.dispatch(&NORM, "group_norm", &params, &[x, gamma, beta, &y], Gpu::grid(sets, 1)?)?;
        Ok(y)
    }

    pub fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let y = self.empty(x.shape())?;
        self.dispatch(&ACTIVATION, "unary", &[u(x.len()), act as u32, 0, 0, 0, 0, 0, 0], &[x, &y], Gpu::grid(x.len(), 256)?)?;
        Ok(y)
    }

    /// GEGLU gate: x [.., 2n] -> x[.., :n] * gelu(x[.., n:]).
    pub fn geglu(&self, x: &Tensor) -> Result<Tensor> {
        let w = *x.shape().last().ok_or_else(|| bad("geglu: scalar input".into()))?;
        if w % 2 != 0 {
            return Err(bad(format!("geglu: last dimension of {:?} is odd", x.shape())));
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = w / 2;
        let y = self.empty(&shape)?;
        self.dispatch(&ACTIVATION, "geglu", &[u(y.len()), 0, u(w / 2), 0, 0, 0, 0, 0], &[x, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    /// a + b or a * b where b repeats: b index = (i / b_inner) % b.len() (see elementwise.wgsl).
    fn binary(&self, op: u32, a: &Tensor, b: &Tensor, b_inner: usize) -> Result<Tensor> {
        if b.is_empty() || b_inner == 0 || a.len() % (b_inner * b.len()) != 0 {
            return Err(bad(format!("cannot broadcast {:?} over {:?}", b.shape(), a.shape())));
        }
        let y = self.empty(a.shape())?;
        let params = [u(a.len()), op, u(b_inner), u(b.len()), 0, 0, 0, 0];
        self.dispatch(&ELEMENTWISE, "binary", &params, &[a, b, &y], Gpu::grid(a.len(), 256)?)?;
        Ok(y)
    }

    /// a + b for equal shapes, or b broadcast over a's leading axes (b's shape a suffix of a's).
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.check_suffix(a, b, "add")?;
        self.binary(0, a, b, 1)
    }

    pub fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.check_suffix(a, b, "mul")?;
        self.binary(1, a, b, 1)
    }

    fn check_suffix(&self, a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        if !a.shape().ends_with(b.shape()) {
            return Err(bad(format!("{what}: {:?} does not broadcast over {:?}", b.shape(), a.shape())));
        }
        Ok(())
    }

    /// x [batch, channels, ...spatial] + b per channel: b [channels] or [batch, channels].
    pub fn add_channelwise(&self, x: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (batch, channels) = match x.shape() {
            [n, c, ..] => (*n, *c),
            s => return Err(bad(format!("add_channelwise: expected [batch, channels, ...], got {s:?}"))),
        };
        if b.shape() != [channels] && b.shape() != [batch, channels] {
            return Err(bad(format!("add_channelwise: {:?} over {:?}", b.shape(), x.shape())));
        }
        self.binary(0, x, b, x.len() / (batch * channels))
    }

    /// alpha * a + beta * b, same shapes.
    pub fn axpby(&self, alpha: f32, a: &Tensor, beta: f32, b: &Tensor) -> Result<Tensor> {
        if a.shape() != b.shape() {
            return Err(bad(format!("axpby: {:?} vs {:?}", a.shape(), b.shape())));
        }
        let y = self.empty(a.shape())?;
        let params = [u(a.len()), 0, 1, 1, alpha.to_bits(), beta.to_bits(), 0, 0];
        self.dispatch(&ELEMENTWISE, "axpby", &params, &[a, b, &y], Gpu::grid(a.len(), 256)?)?;
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
        let inner: usize = sa[axis + 1..].iter().product();
        let mut shape = sa.to_vec();
        shape[axis] += sb[axis];
        let y = self.empty(&shape)?;
        let params = [u(y.len()), 0, 1, 1, 0, 0, u(sa[axis] * inner), u(sb[axis] * inner)];
        self.dispatch(&ELEMENTWISE, "concat", &params, &[a, b, &y], Gpu::grid(y.len(), 256)?)?;
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
        let y = self.zeros(&[ids.len(), dim])?;
        let mut row0 = 0;
        for chunk in chunks {
            let rows = chunk.shape()[0];
            if chunk.shape() != [rows, dim] {
                return Err(bad(format!("embedding: chunk {:?} does not have width {dim}", chunk.shape())));
            }
            let params = [u(ids.len()), u(dim), u(row0), u(rows)];
            self.dispatch(&EMBEDDING, "gather", &params, &[ids, chunk, &y], Gpu::grid(y.len(), 256)?)?;
            row0 += rows;
        }
        Ok(y)
    }

    /// 2-D convolution, x [n, cin, h, w], weight [cout, cin, k, k], bias [cout].
    pub fn conv2d(&self, x: &Tensor, weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
        self.conv2d_padded(x, weight, bias, stride, [padding; 4])
    }

    /// conv2d with zero padding [top, bottom, left, right] (torch's F.pad order is left, right,
    /// top, bottom), e.g. diffusers' Downsample2D with padding 0: [0, 1, 0, 1].
    pub fn conv2d_padded(&self, x: &Tensor, weight: &Tensor, bias: &Tensor, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        let (&[n, cin, h, w], &[cout, wcin, k, k2]) = (x.shape(), weight.shape()) else {
            return Err(bad(format!("conv2d: input {:?}, weight {:?} must be 4-D", x.shape(), weight.shape())));
        };
        let [top, bottom, left, right] = pad;
        let (ph, pw) = (h + top + bottom, w + left + right);
        if wcin != cin || k != k2 || bias.shape() != [cout] || stride == 0 || ph < k || pw < k {
            return Err(bad(format!(
                "conv2d: input {:?}, weight {:?}, bias {:?}, stride {stride}, padding {pad:?}",
                x.shape(),
                weight.shape(),
                bias.shape()
            )));
        }
        let oh = (ph - k) / stride + 1;
        let ow = (pw - k) / stride + 1;
        let y = self.empty(&[n, cout, oh, ow])?;
        let params = [u(n), u(cin), u(h), u(w), u(cout), u(oh), u(ow), u(k), u(stride), u(top), u(left), 0];
        self.dispatch(&CONV, "conv2d", &params, &[x, weight, bias, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    /// Nearest-neighbour resize of [.., h, w] to [.., out_h, out_w] as torch's
    /// F.interpolate(mode="nearest"): ×2 in general, the skip's size in a UNet whose latent is not
    /// a multiple of 2^levels (diffusers' forward_upsample_size).
    pub fn upsample_nearest(&self, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
        let s = x.shape();
        if s.len() < 2 || out_h == 0 || out_w == 0 || s.iter().any(|&d| d == 0) {
            return Err(bad(format!("upsample: [.., h, w] {s:?} to {out_h}x{out_w}")));
        }
        let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
        let mut shape = s.to_vec();
        let r = shape.len();
        (shape[r - 2], shape[r - 1]) = (out_h, out_w);
        let y = self.empty(&shape)?;
        let (scale_y, scale_x) = (h as f32 / out_h as f32, w as f32 / out_w as f32);
        let params = [u(y.len()), u(h), u(w), u(out_h), u(out_w), scale_y.to_bits(), scale_x.to_bits(), 0];
        self.dispatch(&RESAMPLE, "upsample_nearest", &params, &[x, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    pub fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        if s.len() < 2 {
            return Err(bad(format!("upsample: expected [.., h, w], got {s:?}")));
        }
        self.upsample_nearest(x, 2 * s[s.len() - 2], 2 * s[s.len() - 1])
    }

    /// diffusers' get_timestep_embedding: timesteps [n] (f32) -> [n, dim].
    pub fn timestep_embedding(&self, t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f32, scale: f32, max_period: f32) -> Result<Tensor> {
        if t.dtype() != DType::F32 || t.shape().len() != 1 || dim < 2 {
            return Err(bad(format!("timestep_embedding: timesteps must be f32 [n], got {:?} {:?}, dim {dim}", t.dtype(), t.shape())));
        }
        let n = t.len();
        let y = self.empty(&[n, dim])?;
        let params = [u(n), u(dim), flip_sin_to_cos as u32, shift.to_bits(), max_period.ln().to_bits(), scale.to_bits(), 0, 0];
        self.dispatch(&TIMESTEP, "timestep", &params, &[t, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    /// Swaps the last two axes: [.., rows, cols] -> [.., cols, rows]. Moves images between NCHW
    /// ([B, C, H*W]) and the token layout [B, H*W, C] of attention and linear projections.
    pub fn transpose(&self, x: &Tensor) -> Result<Tensor> {
        self.check_float(x, "transpose input")?;
        let s = x.shape();
        if s.len() < 2 {
            return Err(bad(format!("transpose: expected [.., rows, cols], got {s:?}")));
        }
        let (rows, cols) = (s[s.len() - 2], s[s.len() - 1]);
        let mut shape = s.to_vec();
        let r = shape.len();
        shape.swap(r - 2, r - 1);
        let y = self.empty(&shape)?;
        self.dispatch(&RESAMPLE, "transpose", &[u(y.len()), u(rows), u(cols), 0, 0, 0, 0, 0], &[x, &y], Gpu::grid(y.len(), 256)?)?;
        Ok(y)
    }

    /// Pointwise clamp(f(scale * x + shift), lo, hi), f = exp when `exp` (else identity), computed
    /// in f32: e.g. diffusers' image post-processing (x / 2 + 0.5).clamp(0, 1) and a VAE
    /// posterior's clamped logvar and std = exp(logvar / 2). Use ±infinity for an open bound.
    pub fn affine(&self, x: &Tensor, scale: f32, shift: f32, exp: bool, (lo, hi): (f32, f32)) -> Result<Tensor> {
        self.check_float(x, "affine input")?;
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(bad(format!("affine: clamp bounds {lo}..{hi}")));
        }
        let y = self.empty(x.shape())?;
        let params = [u(x.len()), exp as u32, 0, 0, scale.to_bits(), shift.to_bits(), lo.to_bits(), hi.to_bits()];
        self.dispatch(&ACTIVATION, "affine", &params, &[x, &y], Gpu::grid(x.len(), 256)?)?;
        Ok(y)
    }
}
