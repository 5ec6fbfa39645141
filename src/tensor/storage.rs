//! Owned element buffers. Every buffer is counted in a process-wide gauge so tests (and
//! users) can see that the autograd graph gives its memory back.

use super::dtype::{DType, WithDType};
use half::{bf16, f16};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes held by all live CPU tensor buffers of this process.
pub fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// Highest `live_bytes()` seen so far.
pub fn peak_bytes() -> usize {
    PEAK_BYTES.load(Ordering::Relaxed)
}

/// A buffer on the CUDA device: `len` elements of `dtype`.
#[derive(Debug)]
pub struct CudaStorage {
    pub buf: crate::backend::cuda::CudaBuffer,
    pub dtype: DType,
    pub len: usize,
}

#[derive(Debug)]
pub enum StorageData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    U32(Vec<u32>),
    /// Device memory (not counted in `live_bytes`; see the CUDA allocator's stats).
    Cuda(CudaStorage),
}

#[derive(Debug)]
pub struct Storage {
    data: StorageData,
    bytes: usize,
}

impl Storage {
    pub fn new(data: StorageData) -> Self {
        let bytes = match &data {
            StorageData::F32(v) => v.len() * 4,
            StorageData::F64(v) => v.len() * 8,
            StorageData::BF16(v) => v.len() * 2,
            StorageData::F16(v) => v.len() * 2,
            StorageData::I64(v) => v.len() * 8,
            StorageData::U32(v) => v.len() * 4,
            StorageData::Cuda(_) => 0,
        };
        let now = LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
        Storage { data, bytes }
    }

    pub fn from_vec<T: WithDType>(v: Vec<T>) -> Self {
        Self::new(T::wrap(v))
    }

    pub fn dtype(&self) -> DType {
        match &self.data {
            StorageData::F32(_) => DType::F32,
            StorageData::F64(_) => DType::F64,
            StorageData::BF16(_) => DType::BF16,
            StorageData::F16(_) => DType::F16,
            StorageData::I64(_) => DType::I64,
            StorageData::U32(_) => DType::U32,
            StorageData::Cuda(c) => c.dtype,
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.data, StorageData::Cuda(_))
    }

    pub fn cuda(&self) -> Option<&CudaStorage> {
        match &self.data {
            StorageData::Cuda(c) => Some(c),
            _ => None,
        }
    }

    pub fn data(&self) -> &StorageData {
        &self.data
    }

    pub fn as_slice<T: WithDType>(&self) -> Option<&[T]> {
        T::unwrap(&self.data)
    }

    pub fn as_mut_slice<T: WithDType>(&mut self) -> Option<&mut [T]> {
        T::unwrap_mut(&mut self.data)
    }

    /// Raw little-endian bytes (for safetensors); empty for device storage (copy it to the
    /// CPU first, as `Tensor::to_bytes` does).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            StorageData::F32(v) => bytemuck::cast_slice(v),
            StorageData::F64(v) => bytemuck::cast_slice(v),
            StorageData::BF16(v) => bytemuck::cast_slice(v),
            StorageData::F16(v) => bytemuck::cast_slice(v),
            StorageData::I64(v) => bytemuck::cast_slice(v),
            StorageData::U32(v) => bytemuck::cast_slice(v),
            StorageData::Cuda(_) => &[],
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Moving typed vectors in and out of `StorageData`.
pub trait StorageElem: Sized {
    fn wrap(v: Vec<Self>) -> StorageData;
    fn unwrap(d: &StorageData) -> Option<&[Self]>;
    fn unwrap_mut(d: &mut StorageData) -> Option<&mut [Self]>;
}

macro_rules! storage_elem {
    ($t:ty, $v:ident) => {
        impl StorageElem for $t {
            fn wrap(v: Vec<Self>) -> StorageData {
                StorageData::$v(v)
            }
            fn unwrap(d: &StorageData) -> Option<&[Self]> {
                match d {
                    StorageData::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn unwrap_mut(d: &mut StorageData) -> Option<&mut [Self]> {
                match d {
                    StorageData::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
storage_elem!(f32, F32);
storage_elem!(f64, F64);
storage_elem!(bf16, BF16);
storage_elem!(f16, F16);
storage_elem!(i64, I64);
storage_elem!(u32, U32);
