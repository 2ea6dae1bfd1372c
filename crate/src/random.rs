//! torch's CPU random numbers, reproduced bit for bit so that a seed gives the same initial latents
//! as diffusers: `TorchGenerator::new(seed)` is `torch.Generator("cpu").manual_seed(seed)` and
//! `randn(n)` is `torch.randn([n], generator=g, dtype=torch.float32)` (any shape with n elements:
//! the values fill the tensor in row-major order).
//!
//! torch draws float32 normals in two ways, chosen by the element count of each call:
//! - n >= 16: `normal_fill` — n float uniforms, then Box–Muller on blocks of 16 pairing element
//!   i with i + 8; when n is not a multiple of 16 the last 16 elements are overwritten by a fresh
//!   block drawn after the others. x86 builds run the AVX2 variant, whose log/sin/cos are the
//!   Cephes polynomials of `avx_mathfun.h`; they are reproduced here, including the multiply-adds
//!   that the compiler fused, and match torch 2.15's x86 wheels exactly (torch without AVX2,
//!   e.g. on ARM, uses libm's float log/sin/cos instead and differs by about an ulp).
//! - n < 16: one double-precision Box–Muller pair per two values; the second value of a pair is
//!   cached on the generator and returned by the next scalar draw, even one in a later call.

use std::f64::consts::PI;

/// `torch.Generator("cpu")`: an mt19937 stream plus torch's cached second normal.
pub struct TorchGenerator {
    mt: Mt19937,
    /// The unused sine half of the last scalar Box–Muller pair.
    next_normal: Option<f64>,
}

impl TorchGenerator {
    /// `manual_seed(seed)`. As in torch, only the low 32 bits seed the mt19937 state.
    pub fn new(seed: u64) -> TorchGenerator {
        TorchGenerator { mt: Mt19937::new(seed as u32), next_normal: None }
    }

    /// `n` standard normal float32 values, continuing the stream exactly as consecutive
    /// `torch.randn` calls on the same generator do.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for u in tail.iter_mut() {
                *u = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }

    /// `uniform_real_distribution<float>(0, 1)`: the low 24 bits of one 32-bit draw.
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0xFF_FFFF) as f32 / (1u32 << 24) as f32
    }

    /// `uniform_real_distribution<double>(0, 1)`: the low 53 bits of two draws, the first one high.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        (((hi << 32) | lo) & ((1 << 53) - 1)) as f64 / (1u64 << 53) as f64
    }

    /// `normal_distribution<double>`: Box–Muller with the sine half cached for the next call.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * PI * u1;
        self.next_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

/// Box–Muller on 16 uniforms in place: element j and j + 8 become the cosine and sine halves of
/// one pair (torch's `normal_fill_16_AVX2`).
fn normal_fill_16(data: &mut [f32]) {
    let two_pi = (2.0 * PI) as f32;
    for j in 0..8 {
        // 1 - u maps [0, 1) to (0, 1] for the log.
        let radius = (-2.0 * log(1.0 - data[j])).sqrt();
        let (sin, cos) = sincos(two_pi * data[j + 8]);
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// Natural log for x in (0, 1] as avx_mathfun's `log256_ps` computes it (Cephes `logf`).
#[allow(clippy::excessive_precision)] // Cephes' constants as published
fn log(x: f32) -> f32 {
    use std::f32::consts::FRAC_1_SQRT_2;
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    // ln 2 split in two so that e * LN2_HI is exact.
    const LN2_LO: f32 = -2.12194440e-4;
    const LN2_HI: f32 = 0.693359375;

    // x = m * 2^e with m in [0.5, 1).
    let bits = x.to_bits();
    let m = f32::from_bits((bits & !0x7F80_0000) | 0.5f32.to_bits());
    let e = ((bits >> 23) as i32 - 0x7F) as f32 + 1.0;
    // Keep m - 1 small: below sqrt(1/2) use 2m - 1 and e - 1.
    let (e, x) = if m < FRAC_1_SQRT_2 { (e - 1.0, (m - 1.0) + m) } else { (e, m - 1.0) };

    let z = x * x;
    let y = P[1..].iter().fold(P[0], |y, &p| y.mul_add(x, p)) * x;
    let y = y.mul_add(z, e * LN2_LO) - z * 0.5;
    e.mul_add(LN2_HI, x + y)
}

/// (sin x, cos x) for x >= 0 as avx_mathfun's `sincos256_ps` computes them (Cephes `sinf`/`cosf`).
#[allow(clippy::excessive_precision)] // Cephes' constants as published
fn sincos(x: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.27323954473516;
    // π/4 split in three for an accurate reduction x - j π/4.
    const DP: [f32; 3] = [0.78515625, 2.4187564849853515625e-4, 3.77489497744594108e-8];
    const SIN_P: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    const COS_P: [f32; 3] = [2.443315711809948E-005, -1.388731625493765E-003, 4.166664568298827E-002];

    // j: the octant rounded up to even, so the reduced x lies in [-π/4, π/4].
    let j = ((x * FOUR_OVER_PI) as i32 + 1) & !1;
    let jf = j as f32;
    let x = DP.iter().fold(x, |x, &dp| jf.mul_add(-dp, x));

    let z = x * x;
    let c = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]) * z;
    let c = c.mul_add(z, -(z * 0.5)) + 1.0;
    let s = SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]) * z;
    let s = s.mul_add(x, x);

    // Octants 2 and 6 (mod 8) swap the polynomials; the sign bits follow Cephes.
    let (sin, cos) = if j & 2 == 0 { (s, c) } else { (c, s) };
    let sin = if j & 4 != 0 { -sin } else { sin };
    let cos = if (!(j - 2)) & 4 != 0 { -cos } else { cos };
    (sin, cos)
}

/// The 32-bit Mersenne Twister, seeded like `std::mt19937` (and torch's `at::mt19937`).
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1812433253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index == 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7FFF_FFFF);
            let mag = if y & 1 == 1 { 0x9908_B0DF } else { 0 };
            self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }
}
