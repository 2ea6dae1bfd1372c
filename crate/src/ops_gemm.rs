//! Ops over weight matrices (nn.Linear, nn.Conv2d), dense or block-quantized (`quant::Weight`),
//! through one register-blocked GEMM kernel (shaders/gemm.wgsl) that dequantizes weights as it
//! loads them; activations stay in the working float type and accumulation is f32.

use std::sync::OnceLock;

use bytemuck::Zeroable;

use crate::error::{Error, Result};
use crate::gpu::{kernel_ids, kernel_params, shader, DType, Gpu, Shader, Tensor};
use crate::quant::{QuantFormat, Weight, BLOCK};

kernel_params! {
    struct GemmParams {
        m: u32, n: u32, k: u32, blocks: u32, // GEMM rows, cols, depth; weight blocks of 32 per row
        format: u32, addend: u32, geglu: u32, _p0: u32, // a WeightFormat, an AddendKind
        cin: u32, h: u32, w: u32, ow: u32, // conv2d only
        ksize: u32, stride: u32, pad_y: u32, pad_x: u32, // pad_y rows above, pad_x columns left
    }
}
const GEMM: Shader<GemmParams> = shader!("gemm", WeightFormat::KERNEL_IDS, AddendKind::KERNEL_IDS);

kernel_ids! {
    /// How the kernel decodes a weight (gemm.wgsl's FORMAT_*). It also compares ranges: dense
    /// from F16 on, K-quants from Q2_K on.
    #[allow(non_camel_case_types)] // ggml's names
    #[derive(Debug, Clone, Copy)]
    enum WeightFormat as "FORMAT" {
        Q8_0 = 0,
        Q4_1 = 1,
        Q4_0 = 2,
        F16 = 3,
        F32 = 4,
        Q2_K = 5,
        Q3_K = 6,
        Q4_K = 7,
        Q5_K = 8,
        Q6_K = 9,
    }
}

impl From<QuantFormat> for WeightFormat {
    fn from(format: QuantFormat) -> WeightFormat {
        match format {
            QuantFormat::Q8_0 => WeightFormat::Q8_0,
            QuantFormat::Q4_1 => WeightFormat::Q4_1,
            QuantFormat::Q4_0 => WeightFormat::Q4_0,
            QuantFormat::Q2_K => WeightFormat::Q2_K,
            QuantFormat::Q3_K => WeightFormat::Q3_K,
            QuantFormat::Q4_K => WeightFormat::Q4_K,
            QuantFormat::Q5_K => WeightFormat::Q5_K,
            QuantFormat::Q6_K => WeightFormat::Q6_K,
        }
    }
}

kernel_ids! {
    /// What the kernel adds to its product (gemm.wgsl's ADD_*; see `Addend`).
    #[derive(Debug, Clone, Copy)]
    enum AddendKind as "ADD" {
        None = 0,
        Bias = 1,
        Full = 2,
    }
}

/// Big tiles (128 × 128 outputs per workgroup, 8 × 8 per invocation) once a problem has at least
/// this many of them; else 64 × 64 (4 × 4), which leave fewer GPU cores idle on small problems.
const BIG_TILES_FROM: usize = 256;

/// The prelude of shaders/gemm.wgsl for RM × RN outputs per invocation: the accumulators as
/// private vec4s and the code that touches them, unrolled (see the shader's header).
fn unrolled(rm: usize, rn: usize) -> String {
    let (vm, vn) = (rm / 4, rn / 4);
    let mut s = format!("const RM: u32 = {rm}u;\nconst RN: u32 = {rn}u;\n");
    for r in 0..rm {
        for j in 0..vn {
            s += &format!("var<private> acc_{r}_{j}: vec4<f32>;\n");
        }
    }
    s += "fn multiply_tiles(tx: u32, ty: u32) {\n    workgroupBarrier();\n    for (var kk = 0u; kk < BK; kk = kk + 1u) {\n";
    s += &format!("        let ab = kk * (BM / 4u) + ty * {vm}u;\n        let bb = kk * (BN / 4u) + tx * {vn}u;\n");
    for i in 0..vm {
        s += &format!("        let a{i} = sa[ab + {i}u];\n");
    }
    for j in 0..vn {
        s += &format!("        let b{j} = sb[bb + {j}u];\n");
    }
    for r in 0..rm {
        let lane = ["x", "y", "z", "w"][r % 4];
        for j in 0..vn {
            s += &format!("        acc_{r}_{j} = fma(vec4<f32>(a{}.{lane}), b{j}, acc_{r}_{j});\n", r / 4);
        }
    }
    // The vec4 is returned by value and indexed there: indexing the private variable itself with
    // a dynamic index would force every accumulator into addressable (local) memory.
    s += "    }\n    workgroupBarrier();\n}\nfn acc_vec(r: u32, c: u32) -> vec4<f32> {\n    switch (r * RN / 4u + c / 4u) {\n";
    for r in 0..rm {
        for j in 0..vn {
            s += &format!("        case {}u: {{ return acc_{r}_{j}; }}\n", r * vn + j);
        }
    }
    s + "        default: { return vec4<f32>(0.0); }\n    }\n}\nfn acc_at(r: u32, c: u32) -> f32 {\n    return acc_vec(r, c)[c % 4u];\n}\n"
}

fn bad(msg: String) -> Error {
    Error::InvalidParameter(msg)
}

fn u(x: usize) -> u32 {
    x as u32
}

/// What a GEMM adds to its product.
#[derive(Clone, Copy)]
enum Addend<'a> {
    None,
    /// A vector over the output's rows (Linear) or channels (Conv2d).
    Bias(&'a Tensor),
    /// A tensor shaped as the output (before GEGLU).
    Full(&'a Tensor),
}

impl<'a> Addend<'a> {
    fn bias(bias: Option<&'a Tensor>) -> Addend<'a> {
        bias.map_or(Addend::None, Addend::Bias)
    }

    fn kind(self) -> AddendKind {
        match self {
            Addend::None => AddendKind::None,
            Addend::Bias(_) => AddendKind::Bias,
            Addend::Full(_) => AddendKind::Full,
        }
    }

    fn tensor(self) -> Option<&'a Tensor> {
        match self {
            Addend::None => None,
            Addend::Bias(t) | Addend::Full(t) => Some(t),
        }
    }
}

/// A weight matrix [rows, cols] as the kernel reads it.
struct Operand<'a> {
    data: &'a Tensor,
    scales: &'a Tensor,
    format: WeightFormat,
    rows: usize,
    cols: usize,
}

impl Gpu {
    fn operand<'a>(&self, w: &'a Weight, what: &str) -> Result<Operand<'a>> {
        Ok(match w {
            Weight::Dense(t) => {
                let (&rows, rest) = t.shape().split_first().ok_or_else(|| bad(format!("{what}: scalar weight")))?;
                let format = match t.dtype() {
                    DType::F16 => WeightFormat::F16,
                    DType::F32 => WeightFormat::F32,
                    DType::U32 => return Err(bad(format!("{what}: integer weight"))),
                };
                Operand { data: t, scales: t, format, rows, cols: rest.iter().product() }
            }
            Weight::Quant(q) => Operand { data: &q.data, scales: q.scales.as_ref().unwrap_or(&q.data), format: q.format.into(), rows: q.rows, cols: q.cols },
        })
    }

    /// The float type of input x and its addend (the GEMM's compute and output type; the weight
    /// may be stored in any format), checking the addend's shape against the output's `rows`
    /// (a bias) or `full` (a whole addend).
    fn input_dtype(&self, x: &Tensor, addend: Addend, rows: usize, full: &[usize], what: &str) -> Result<DType> {
        let (b, expected, name) = match addend {
            Addend::None => return self.float_dtype(what, &[(x, "input")]),
            Addend::Bias(b) => (b, vec![rows], "bias"),
            Addend::Full(b) => (b, full.to_vec(), "addend"),
        };
        if b.shape() != expected {
            return Err(bad(format!("{what}: {name} {:?} does not match the output {expected:?}", b.shape())));
        }
        self.float_dtype(what, &[(x, "input"), (b, name)])
    }

    /// Prelude and tile edge for an output of `rows` × `cols`.
    fn tiles(rows: usize, cols: usize) -> (&'static str, usize) {
        static BIG: OnceLock<String> = OnceLock::new();
        static SMALL: OnceLock<String> = OnceLock::new();
        match rows.div_ceil(128) * cols.div_ceil(128) >= BIG_TILES_FROM {
            true => (BIG.get_or_init(|| unrolled(8, 8)), 128),
            false => (SMALL.get_or_init(|| unrolled(4, 4)), 64),
        }
    }

    /// nn.Linear: x [.., k] · W[n, k]ᵀ + bias [n] -> [.., n].
    pub fn linear(&self, x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
        self.gemm_linear(x, weight, Addend::bias(bias), false)
    }

    /// x · Wᵀ + `addend`, a whole [.., n] tensor (the bias and a LoRA's term, see crate::adapt).
    pub fn linear_plus(&self, x: &Tensor, weight: &Weight, addend: &Tensor) -> Result<Tensor> {
        self.gemm_linear(x, weight, Addend::Full(addend), false)
    }

    /// diffusers' GEGLU in one kernel: the projection x · Wᵀ + bias [.., 2n] split into value and
    /// gate halves, value · gelu(gate) -> [.., n]; the projection is never stored.
    pub fn linear_geglu(&self, x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
        self.gemm_linear(x, weight, Addend::bias(bias), true)
    }

    /// `linear_geglu` with a whole [.., 2n] addend to the projection instead of a bias.
    pub fn linear_geglu_plus(&self, x: &Tensor, weight: &Weight, addend: &Tensor) -> Result<Tensor> {
        self.gemm_linear(x, weight, Addend::Full(addend), true)
    }

    fn gemm_linear(&self, x: &Tensor, weight: &Weight, addend: Addend, geglu: bool) -> Result<Tensor> {
        let w = self.operand(weight, "linear")?;
        let (&k, lead) = x.shape().split_last().ok_or_else(|| bad("linear: scalar input".into()))?;
        if w.cols != k || (geglu && w.rows % 2 != 0) {
            return Err(bad(format!("linear: input {:?} does not match weight [{}, {}]", x.shape(), w.rows, w.cols)));
        }
        let mut shape = lead.to_vec();
        shape.push(w.rows);
        let dtype = self.input_dtype(x, addend, w.rows, &shape, "linear")?;
        let (m, n) = (lead.iter().product::<usize>(), w.rows);
        let width = if geglu { n / 2 } else { n };
        *shape.last_mut().expect("pushed") = width;
        let y = self.empty_as(&shape, dtype)?;
        let (defines, tile) = Gpu::tiles(m, n);
        let params = GemmParams {
            m: u(m), n: u(n), k: u(k), blocks: u(k.div_ceil(BLOCK)),
            format: w.format as u32, addend: addend.kind() as u32, geglu: geglu as u32,
            ..Zeroable::zeroed()
        };
        let cols_per_group = if geglu { tile / 2 } else { tile };
        let groups = [u(width.div_ceil(cols_per_group)), u(m.div_ceil(tile)), 1];
        let addend = addend.tensor().unwrap_or(x);
        self.dispatch_with(&GEMM, "linear", dtype, defines, &params, &[x, w.data, w.scales, &y, addend], groups)?;
        Ok(y)
    }

    /// 2-D convolution with a square kernel, x [n, cin, h, w], weight [cout, cin, k, k] (dense) or
    /// [rows = cout, cols = cin·k·k] (quantized, torch's layout flattened), bias [cout], zero
    /// padding [top, bottom, left, right] (torch's F.pad order is left, right, top, bottom), e.g.
    /// diffusers' Downsample2D with padding 0: [0, 1, 0, 1].
    pub fn conv2d(&self, x: &Tensor, weight: &Weight, k: usize, bias: Option<&Tensor>, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        self.gemm_conv2d(x, weight, k, Addend::bias(bias), stride, pad)
    }

    /// `conv2d` plus a whole [n, cout, oh, ow] `addend` instead of a bias (see `linear_plus`).
    pub fn conv2d_plus(&self, x: &Tensor, weight: &Weight, k: usize, addend: &Tensor, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        self.gemm_conv2d(x, weight, k, Addend::Full(addend), stride, pad)
    }

    fn gemm_conv2d(&self, x: &Tensor, weight: &Weight, k: usize, addend: Addend, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        let w = self.operand(weight, "conv2d")?;
        let &[n, cin, h, wd] = x.shape() else {
            return Err(bad(format!("conv2d: input {:?} must be 4-D", x.shape())));
        };
        let [top, bottom, left, right] = pad;
        let (ph, pw) = (h + top + bottom, wd + left + right);
        if k == 0 || w.cols != cin * k * k || stride == 0 || ph < k || pw < k {
            return Err(bad(format!(
                "conv2d: input {:?}, weight [{}, {}] with kernel {k}, stride {stride}, padding {pad:?}",
                x.shape(),
                w.rows,
                w.cols
            )));
        }
        let cout = w.rows;
        let (oh, ow) = ((ph - k) / stride + 1, (pw - k) / stride + 1);
        let dtype = self.input_dtype(x, addend, cout, &[n, cout, oh, ow], "conv2d")?;
        let y = self.empty_as(&[n, cout, oh, ow], dtype)?;
        let (defines, tile) = Gpu::tiles(cout, n * oh * ow);
        let params = GemmParams {
            m: u(cout), n: u(oh * ow), k: u(w.cols), blocks: u(w.cols.div_ceil(BLOCK)),
            format: w.format as u32, addend: addend.kind() as u32, geglu: 0, _p0: 0,
            cin: u(cin), h: u(h), w: u(wd), ow: u(ow),
            ksize: u(k), stride: u(stride), pad_y: u(top), pad_x: u(left),
        };
        let groups = [u((oh * ow).div_ceil(tile)), u(cout.div_ceil(tile)), u(n)];
        let addend = addend.tensor().unwrap_or(x);
        self.dispatch_with(&GEMM, "conv2d", dtype, defines, &params, &[x, w.data, w.scales, &y, addend], groups)?;
        Ok(y)
    }
}
