//! Ops over block-quantized weights (`quant::QuantTensor`): the weight is dequantized inside the
//! kernels, one 32-value block per workgroup tile; activations stay in the working float type and
//! accumulation is f32.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Shader, Tensor};
use crate::quant::QuantTensor;

const QUANT_MATMUL: Shader = Shader {
    name: "quant_matmul",
    source: concat!(include_str!("../../shaders/quant_common.wgsl"), include_str!("../../shaders/quant_matmul.wgsl")),
};
const QUANT_CONV: Shader = Shader {
    name: "quant_conv",
    source: concat!(include_str!("../../shaders/quant_common.wgsl"), include_str!("../../shaders/quant_conv.wgsl")),
};

/// Output tile edge of both kernels (32 × 32 outputs per workgroup).
const TILE: usize = 32;

fn bad(msg: String) -> Error {
    Error::InvalidParameter(msg)
}

fn u(x: usize) -> u32 {
    x as u32
}

impl Gpu {
    fn check_float_q(&self, t: &Tensor, what: &str) -> Result<()> {
        if t.dtype() != self.dtype {
            return Err(bad(format!("{what}: expected a {:?} tensor, got {:?}", self.dtype, t.dtype())));
        }
        Ok(())
    }

    fn check_bias_q(&self, bias: Option<&Tensor>, rows: usize, what: &str) -> Result<()> {
        if let Some(b) = bias {
            self.check_float_q(b, what)?;
            if b.shape() != [rows] {
                return Err(bad(format!("{what}: bias {:?} does not match {rows} outputs", b.shape())));
            }
        }
        Ok(())
    }

    /// nn.Linear over a quantized weight: x [.., k] · W[n, k]ᵀ + bias [n] -> [.., n], with W
    /// [rows = n, cols = k].
    pub fn linear_q(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.check_float_q(x, "linear_q input")?;
        let (&k, lead) = x.shape().split_last().ok_or_else(|| bad("linear_q: scalar input".into()))?;
        if w.cols != k {
            return Err(bad(format!("linear_q: input {:?} does not match {:?} weight [{}, {}]", x.shape(), w.format, w.rows, w.cols)));
        }
        self.check_bias_q(bias, w.rows, "linear_q")?;
        let (m, n) = (lead.iter().product::<usize>(), w.rows);
        let mut shape = lead.to_vec();
        shape.push(n);
        let y = self.empty(&shape)?;
        let params = [u(m), u(n), u(k), u(w.blocks_per_row()), w.format.kernel_id(), 0, 0, 0];
        let groups = [u(n.div_ceil(TILE)), u(m.div_ceil(TILE)), 1];
        match bias {
            Some(b) => self.dispatch(&QUANT_MATMUL, "linear_q_bias", &params, &[x, &w.data, &w.scales, &y, b], groups)?,
            None => self.dispatch(&QUANT_MATMUL, "linear_q", &params, &[x, &w.data, &w.scales, &y], groups)?,
        }
        Ok(y)
    }

    /// 2-D convolution over a quantized weight, same semantics as `conv2d_padded`: x [n, cin, h,
    /// w], W [rows = cout, cols = cin·k·k] (torch's [cout, cin, k, k] flattened), bias [cout],
    /// zero padding [top, bottom, left, right].
    pub fn conv2d_q(&self, x: &Tensor, w: &QuantTensor, k: usize, bias: Option<&Tensor>, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        self.check_float_q(x, "conv2d_q input")?;
        let &[n, cin, h, wd] = x.shape() else {
            return Err(bad(format!("conv2d_q: input {:?} must be 4-D", x.shape())));
        };
        let [top, bottom, left, right] = pad;
        let (ph, pw) = (h + top + bottom, wd + left + right);
        if k == 0 || w.cols != cin * k * k || stride == 0 || ph < k || pw < k {
            return Err(bad(format!(
                "conv2d_q: input {:?}, {:?} weight [{}, {}] with kernel {k}, stride {stride}, padding {pad:?}",
                x.shape(),
                w.format,
                w.rows,
                w.cols
            )));
        }
        self.check_bias_q(bias, w.rows, "conv2d_q")?;
        let cout = w.rows;
        let oh = (ph - k) / stride + 1;
        let ow = (pw - k) / stride + 1;
        let y = self.empty(&[n, cout, oh, ow])?;
        let params = [
            u(n), u(cin), u(h), u(wd),
            u(cout), u(oh), u(ow), u(k),
            u(stride), u(top), u(left), w.format.kernel_id(),
            u(w.blocks_per_row()), u(w.cols), 0, 0,
        ];
        let groups = [u((oh * ow).div_ceil(TILE)), u(cout.div_ceil(TILE)), u(n)];
        match bias {
            Some(b) => self.dispatch(&QUANT_CONV, "conv2d_q_bias", &params, &[x, &w.data, &w.scales, &y, b], groups)?,
            None => self.dispatch(&QUANT_CONV, "conv2d_q", &params, &[x, &w.data, &w.scales, &y], groups)?,
        }
        Ok(y)
    }
}
