//! Element types. f32/f64 compute on CPU; bf16/f16 are storage types (cast to compute);
//! i64/u32 carry token ids, indices and masks.

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    #[default]
    F32,
    F64,
    BF16,
    F16,
    I64,
    U32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
    }
    /// Whether the model can compute in this dtype on `device`: f32 anywhere, bf16 on CUDA (the
    /// CPU backend computes in f32). The error says why not; `cuda` is how the caller's user
    /// chooses CUDA (a flag or a config key), named as the remedy.
    pub fn check_compute_on(
        self,
        device: crate::Device,
        cuda: &str,
    ) -> std::result::Result<(), String> {
        match (self, device) {
            (DType::F32, _) | (DType::BF16, crate::Device::Cuda) => Ok(()),
            (_, crate::Device::Cpu) => Err(format!(
                "the CPU backend computes in f32 (bf16 needs {cuda})"
            )),
            _ => Err("want f32 or bf16".into()),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::U32 => "u32",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<DType> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "f64" | "float64" => Ok(DType::F64),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            "i64" | "int64" => Ok(DType::I64),
            "u32" | "uint32" => Ok(DType::U32),
            _ => Err(crate::Error::msg(format!(
                "unknown dtype {s:?} (expected f32, f64, bf16, f16, i64 or u32)"
            ))),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that can live in a tensor.
pub trait WithDType:
    Copy + Send + Sync + 'static + bytemuck::Pod + std::fmt::Debug + super::storage::StorageElem
{
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! with_dtype {
    ($t:ty, $d:ident, $to:expr, $from:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$d;
            #[inline]
            fn to_f64(self) -> f64 {
                $to(self)
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
        }
    };
}
with_dtype!(f32, F32, |v: f32| v as f64, |v: f64| v as f32);
with_dtype!(f64, F64, |v: f64| v, |v: f64| v);
with_dtype!(bf16, BF16, |v: bf16| v.to_f64(), bf16::from_f64);
with_dtype!(f16, F16, |v: f16| v.to_f64(), f16::from_f64);
with_dtype!(i64, I64, |v: i64| v as f64, |v: f64| v as i64);
with_dtype!(u32, U32, |v: u32| v as f64, |v: f64| v as u32);

/// The compute types of the CPU backend (f32 and f64).
pub trait Float:
    WithDType
    + num_traits::Float
    + num_traits::FromPrimitive
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
{
    /// erf, for the exact GELU.
    fn error_fn(self) -> Self;
    /// exp for the fused kernels: f32 uses a branch-free polynomial that vectorises (max
    /// relative error ~2e-7, exp(-inf) = 0, NaN stays NaN); f64 is the exact `exp`.
    fn exp_fast(self) -> Self;
    #[inline]
    fn c(v: f64) -> Self {
        <Self as WithDType>::from_f64(v)
    }
}

impl Float for f32 {
    #[inline]
    fn error_fn(self) -> Self {
        libm::erff(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

/// Cephes-style expf: x = n ln2 + r with |r| <= ln2/2 (Cody–Waite split of ln2), a degree-6
/// polynomial for e^r, and 2^n built in the exponent bits.
///
/// Branch-free so that loops over it vectorise (8 lanes with AVX2): the clamps and the edge
/// cases are selects, and the clamped x keeps the float-to-int conversion in range (a
/// saturating `as i32` compiled to scalar code with branches and made every exp loop scalar).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // NaN fails both comparisons and is clamped to 88.7 here; it is put back at the end.
    let xc = if x < 88.7 { x } else { 88.7 };
    let xc = if xc > -87.0 { xc } else { -87.0 };
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r + 1.0);
    // SAFETY: n = floor(xc log2 e + 0.5) with xc in [-87, 88.7] is an integer in [-126, 128].
    let n: i32 = unsafe { n.to_int_unchecked() };
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    let y = p * scale;
    let y = if x < -87.0 { 0.0 } else { y };
    let y = if x > 88.7 { f32::INFINITY } else { y };
    // x + x: NaN quieted, as the arithmetic quieted it before.
    if x.is_nan() {
        x + x
    } else {
        y
    }
}
impl Float for f64 {
    #[inline]
    fn error_fn(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_is_accurate_and_handles_the_edges() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
