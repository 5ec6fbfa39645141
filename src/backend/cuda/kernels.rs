//! The kernel sources, embedded at build time. Every file here is compiled by NVRTC on first
//! use (and by the CI compile check for sm_80 and sm_90).

/// Prepended to every file: bf16 helpers, `Strides`, warp/block reductions.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Prepended after `COMMON` to the files that use Hopper-only instructions (those marked
/// `TESSERA_ARCH_SUFFIX_A`): descriptors, wgmma wrappers, TMA loads, mbarriers.
pub const HOPPER: &str = include_str!("../../../kernels/hopper.cuh");

/// The marker of a file compiled for sm_90a (not sm_90) that also gets `HOPPER`.
pub const HOPPER_MARKER: &str = "TESSERA_ARCH_SUFFIX_A";

macro_rules! sources {
    ($($f:literal),* $(,)?) => {
        /// (file name, source) of every kernel file.
        pub const SOURCES: &[(&str, &str)] = &[$(($f, include_str!(concat!("../../../kernels/", $f)))),*];
    };
}
sources!(
    "copy.cu",
    "elementwise.cu",
    "reduce.cu",
    "norm.cu",
    "rope.cu",
    "activation.cu",
    "loss.cu",
    "index.cu",
    "matmul.cu",
    "attention.cu",
    "optim.cu",
    "gemm.cu",
    "flash.cu",
    "gemm_sm90.cu",
    "flash_sm90.cu",
);

/// The source of `kernels/<file>`.
pub fn source(file: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(f, _)| *f == file).map(|(_, s)| *s)
}

/// Kernel-name suffix for a float dtype: "f32" or "bf16".
pub fn suffix(dtype: crate::DType, op: &'static str) -> crate::Result<&'static str> {
    match dtype {
        crate::DType::F32 => Ok("f32"),
        crate::DType::BF16 => Ok("bf16"),
        d => Err(crate::Error::DType {
            op,
            dtype: d,
            hint: " on cuda (f32 and bf16 only)".into(),
        }),
    }
}
