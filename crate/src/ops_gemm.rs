//! Ops over weight matrices (nn.Linear, nn.Conv2d), dense or block-quantized (`quant::Weight`),
//! through one register-blocked GEMM kernel (shaders/gemm.wgsl) that dequantizes weights as it
//! loads them; activations stay in the working float type and accumulation is f32.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use bytemuck::Zeroable;

use crate::error::{Error, Result};
use crate::gpu::{kernel_ids, kernel_params, shader, DType, Gpu, Shader, Tensor};
use crate::quant::{QuantFormat, Weight, BLOCK};

kernel_params! {
    struct GemmParams {
        m: u32, n: u32, k: u32, blocks: u32, // GEMM rows, cols, depth; weight blocks of 32 per row
        format: u32, bias: u32, residual: u32, geglu: u32, // a WeightFormat, a BiasKind, flags
        cin: u32, h: u32, w: u32, ow: u32, // conv2d only
        stride: u32, pad_y: u32, pad_x: u32, images: u32, // pad_y rows above, pad_x columns left;
        // the columns are the n = oh·ow pixels of each image (the kernel size is the shader's KS)
    }
}
const GEMM: Shader<GemmParams> = shader!("gemm", WeightFormat::KERNEL_IDS, BiasKind::KERNEL_IDS);

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
    /// The bias the kernel adds (gemm.wgsl's BIAS_*; see `Addend`).
    #[derive(Debug, Clone, Copy)]
    enum BiasKind as "BIAS" {
        None = 0,
        Channel = 1,
        ImageChannel = 2,
    }
}

/// What a GEMM adds to its product in its epilogue, so that no extra pass reads and writes the
/// whole output: a bias and a whole tensor (a skip connection; a LoRA's term).
#[derive(Clone, Copy, Default)]
pub struct Addend<'a> {
    /// Over the output's features: [n] (Linear) or [cout] (Conv2d); convolutions also take one
    /// per image, [images, cout].
    pub bias: Option<&'a Tensor>,
    /// Shaped as the output (before GEGLU).
    pub residual: Option<&'a Tensor>,
}

impl<'a> Addend<'a> {
    pub fn bias(bias: Option<&'a Tensor>) -> Addend<'a> {
        Addend { bias, residual: None }
    }

    pub fn residual(residual: &'a Tensor) -> Addend<'a> {
        Addend { bias: None, residual: Some(residual) }
    }
}

/// How a GEMM's output is cut among workgroups: a WX × WY workgroup computes BM = WY·RM rows by
/// BN = WX·RN columns, each invocation an RM × RN block in registers. BM + BN ≤ 256 keeps the two
/// k-slices of a workgroup (shaders/gemm.wgsl's `sa`, `sb`) within WebGPU's 16 KiB default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tiling {
    wx: usize,
    wy: usize,
    rm: usize,
    rn: usize,
}

/// Square 128 × 128 tiles (8 × 8 per invocation) for big problems; 64 × 64 (4 × 4), which leave
/// fewer GPU cores idle, for smaller ones; then (`Tiling::for_output`) narrow tiles, 4 to 32 rows or
/// columns by 128, for outputs whose narrow side would leave most of a 64-wide tile as padding: the
/// few tokens of a small image's deep levels (linear rows) and their few pixels (convolution
/// columns). With a square tile a 4-token level computed 16 times the products it keeps.
const BIG: Tiling = Tiling { wx: 16, wy: 16, rm: 8, rn: 8 };
const SMALL: Tiling = Tiling { wx: 16, wy: 16, rm: 4, rn: 4 };

/// Square big tiles once a problem has at least this many of them.
const BIG_TILES_FROM: usize = 256;

impl Tiling {
    fn bm(self) -> usize {
        self.wy * self.rm
    }

    fn bn(self) -> usize {
        self.wx * self.rn
    }

    /// The tiling for an output of `rows` × `cols`.
    fn for_output(rows: usize, cols: usize) -> Tiling {
        let narrow = rows.min(cols);
        if narrow < 64 {
            // 4, 8, 16 or 32 invocations' worth of rows (or columns), four each.
            let side = narrow.next_power_of_two().clamp(4, 32) / 4;
            return if rows <= cols { Tiling { wx: 32, wy: side, rm: 4, rn: 4 } } else { Tiling { wx: side, wy: 32, rm: 4, rn: 4 } };
        }
        match rows.div_ceil(128) * cols.div_ceil(128) >= BIG_TILES_FROM {
            true => BIG,
            false => SMALL,
        }
    }

    /// The prelude of shaders/gemm.wgsl for this tiling and a convolution's kernel size `ksize`
    /// (1 for a Linear), built once per pair: every dispatch passes one.
    fn prelude(self, ksize: usize) -> Rc<str> {
        thread_local! {
            static PRELUDES: RefCell<HashMap<(Tiling, usize), Rc<str>>> = RefCell::default();
        }
        PRELUDES.with_borrow_mut(|preludes| {
            preludes.entry((self, ksize)).or_insert_with(|| format!("{}const KS: u32 = {ksize}u;\n", unrolled(self)).into()).clone()
        })
    }
}

/// The prelude of shaders/gemm.wgsl for a tiling: the workgroup shape and block sizes, and,
/// unrolled, the accumulators as private vec4s and the code that touches them (see the shader's
/// header).
fn unrolled(t: Tiling) -> String {
    let Tiling { wx, wy, rm, rn } = t;
    let (vm, vn) = (rm / 4, rn / 4);
    let mut s = format!("const WX: u32 = {wx}u;\nconst WY: u32 = {wy}u;\nconst RM: u32 = {rm}u;\nconst RN: u32 = {rn}u;\n");
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

    /// The float type of input x and its addends (the GEMM's compute and output type; the weight
    /// may be stored in any format), and the bias's kind: `biases` lists the shapes a bias may
    /// take, `full` is the output's shape.
    fn epilogue(&self, x: &Tensor, addend: Addend, biases: &[(Vec<usize>, BiasKind)], full: &[usize], what: &str) -> Result<(DType, BiasKind)> {
        let mut inputs = vec![(x, "input")];
        let mut kind = BiasKind::None;
        if let Some(b) = addend.bias {
            kind = biases.iter().find(|(shape, _)| b.shape() == shape).map(|&(_, kind)| kind).ok_or_else(|| {
                bad(format!("{what}: bias {:?} does not match the output {full:?}", b.shape()))
            })?;
            inputs.push((b, "bias"));
        }
        if let Some(r) = addend.residual {
            if r.shape() != full {
                return Err(bad(format!("{what}: addend {:?} does not match the output {full:?}", r.shape())));
            }
            inputs.push((r, "addend"));
        }
        Ok((self.float_dtype(what, &inputs)?, kind))
    }

    /// nn.Linear: x [.., k] · W[n, k]ᵀ + bias [n] -> [.., n].
    pub fn linear(&self, x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
        self.gemm_linear(x, weight, Addend::bias(bias), false)
    }

    /// x · Wᵀ + `addend` (a bias [n], a whole [.., n] tensor).
    pub fn linear_add(&self, x: &Tensor, weight: &Weight, addend: Addend) -> Result<Tensor> {
        self.gemm_linear(x, weight, addend, false)
    }

    /// diffusers' GEGLU in one kernel: the projection x · Wᵀ + `addend` [.., 2n] split into value
    /// and gate halves, value · gelu(gate) -> [.., n]; the projection is never stored.
    pub fn linear_geglu(&self, x: &Tensor, weight: &Weight, addend: Addend) -> Result<Tensor> {
        self.gemm_linear(x, weight, addend, true)
    }

    fn gemm_linear(&self, x: &Tensor, weight: &Weight, addend: Addend, geglu: bool) -> Result<Tensor> {
        let w = self.operand(weight, "linear")?;
        let (&k, lead) = x.shape().split_last().ok_or_else(|| bad("linear: scalar input".into()))?;
        if w.cols != k || (geglu && w.rows % 2 != 0) {
            return Err(bad(format!("linear: input {:?} does not match weight [{}, {}]", x.shape(), w.rows, w.cols)));
        }
        let mut shape = lead.to_vec();
        shape.push(w.rows);
        let (dtype, bias) = self.epilogue(x, addend, &[(vec![w.rows], BiasKind::Channel)], &shape, "linear")?;
        let (m, n) = (lead.iter().product::<usize>(), w.rows);
        let width = if geglu { n / 2 } else { n };
        *shape.last_mut().expect("pushed") = width;
        let y = self.empty_as(&shape, dtype)?;
        let tiling = Tiling::for_output(m, n);
        let params = GemmParams {
            m: u(m), n: u(n), k: u(k), blocks: u(k.div_ceil(BLOCK)),
            format: w.format as u32, bias: bias as u32, residual: addend.residual.is_some() as u32, geglu: geglu as u32,
            ..Zeroable::zeroed()
        };
        let cols_per_group = if geglu { tiling.bn() / 2 } else { tiling.bn() };
        let groups = [u(width.div_ceil(cols_per_group)), u(m.div_ceil(tiling.bm())), 1];
        let (bias, residual) = (addend.bias.unwrap_or(x), addend.residual.unwrap_or(x));
        self.dispatch_with(&GEMM, "linear", dtype, &tiling.prelude(1), &params, &[x, w.data, w.scales, &y, bias, residual], groups)?;
        Ok(y)
    }

    /// 2-D convolution with a square kernel, x [n, cin, h, w], weight [cout, cin, k, k] (dense) or
    /// [rows = cout, cols = cin·k·k] (quantized, torch's layout flattened), bias [cout], zero
    /// padding [top, bottom, left, right] (torch's F.pad order is left, right, top, bottom), e.g.
    /// diffusers' Downsample2D with padding 0: [0, 1, 0, 1].
    pub fn conv2d(&self, x: &Tensor, weight: &Weight, k: usize, bias: Option<&Tensor>, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        self.gemm_conv2d(x, weight, k, Addend::bias(bias), stride, pad)
    }

    /// `conv2d` plus `addend`: a bias [cout] or [n, cout], a whole [n, cout, oh, ow] tensor.
    pub fn conv2d_add(&self, x: &Tensor, weight: &Weight, k: usize, addend: Addend, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        self.gemm_conv2d(x, weight, k, addend, stride, pad)
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
        let biases = [(vec![cout], BiasKind::Channel), (vec![n, cout], BiasKind::ImageChannel)];
        let (dtype, bias) = self.epilogue(x, addend, &biases, &[n, cout, oh, ow], "conv2d")?;
        let y = self.empty_as(&[n, cout, oh, ow], dtype)?;
        // The images' pixels side by side as columns: a small image's deep levels (2 × 2 pixels)
        // fill one tile, and each weight is loaded once for the whole batch.
        let tiling = Tiling::for_output(cout, n * oh * ow);
        let params = GemmParams {
            m: u(cout), n: u(oh * ow), k: u(w.cols), blocks: u(w.cols.div_ceil(BLOCK)),
            format: w.format as u32, bias: bias as u32, residual: addend.residual.is_some() as u32, geglu: 0,
            cin: u(cin), h: u(h), w: u(wd), ow: u(ow),
            stride: u(stride), pad_y: u(top), pad_x: u(left), images: u(n),
        };
        let groups = [u((n * oh * ow).div_ceil(tiling.bn())), u(cout.div_ceil(tiling.bm())), 1];
        let (bias, residual) = (addend.bias.unwrap_or(x), addend.residual.unwrap_or(x));
        self.dispatch_with(&GEMM, "conv2d", dtype, &tiling.prelude(k), &params, &[x, w.data, w.scales, &y, bias, residual], groups)?;
        Ok(y)
    }
}
