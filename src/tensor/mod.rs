//! `Tensor`: a shared, immutable-by-default view (`Layout`) over a reference-counted buffer
//! (`Storage`), plus the autograd bookkeeping of the node that produced it.

mod dtype;
mod layout;
mod rng;
mod storage;

pub use dtype::{DType, Float, WithDType};
pub use layout::{broadcast_shapes, contiguous_strides, Layout};
pub use rng::Rng;
pub use storage::{live_bytes, peak_bytes, CudaStorage, Storage, StorageData, StorageElem};

use crate::autograd::Node;
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Runs `$body` with `$T` bound to the Rust type of a float dtype (f32 or f64); any other dtype
/// is an error naming the op.
#[macro_export]
macro_rules! float_dispatch {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            d => return Err($crate::Error::dtype($op, d)),
        }
    };
}

/// Runs `$body` with `$T` bound to the Rust type of any dtype.
#[macro_export]
macro_rules! any_dispatch {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::U32 => {
                type $T = u32;
                $body
            }
        }
    };
}

/// Where a tensor's elements live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The process's CUDA device (ordinal 0).
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "cuda:0" | "gpu" => Ok(Device::Cuda),
            _ => Err(Error::msg(format!(
                "unknown device {s:?} (expected cpu or cuda)"
            ))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

pub struct TensorInner {
    id: TensorId,
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    dtype: DType,
    /// The op that produced this tensor (None for leaves and for tensors made under no_grad).
    grad_fn: Option<Arc<Node>>,
    /// Leaves: whether gradients are wanted. Non-leaves: whether any input wanted them.
    requires_grad: bool,
    /// Gradient accumulated by `backward()` (leaves only).
    grad: Mutex<Option<Tensor>>,
}

#[derive(Clone)]
pub struct Tensor(Arc<TensorInner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}{}]",
            self.shape(),
            self.dtype(),
            if self.requires_grad() { ", grad" } else { "" }
        )
    }
}

impl Tensor {
    // ---------------------------------------------------------------- construction

    pub(crate) fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        let dtype = storage.dtype();
        Tensor(Arc::new(TensorInner {
            id: TensorId::new(),
            storage: Arc::new(RwLock::new(storage)),
            layout: Layout::contiguous(shape),
            dtype,
            grad_fn: None,
            requires_grad: false,
            grad: Mutex::new(None),
        }))
    }

    /// A new tensor sharing this one's buffer with another layout (a view).
    pub(crate) fn view_with(&self, layout: Layout) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::new(),
            storage: self.0.storage.clone(),
            layout,
            dtype: self.0.dtype,
            grad_fn: None,
            requires_grad: false,
            grad: Mutex::new(None),
        }))
    }

    /// Attaches the producing node (used by `autograd::record`).
    pub(crate) fn with_grad_fn(self, node: Arc<Node>) -> Tensor {
        let inner = match Arc::try_unwrap(self.0) {
            Ok(inner) => inner,
            Err(shared) => TensorInner {
                id: TensorId::new(),
                storage: shared.storage.clone(),
                layout: shared.layout.clone(),
                dtype: shared.dtype,
                grad_fn: None,
                requires_grad: false,
                grad: Mutex::new(None),
            },
        };
        Tensor(Arc::new(TensorInner {
            grad_fn: Some(node),
            requires_grad: true,
            ..inner
        }))
    }

    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "from_vec",
                format!("{} elements cannot have shape {shape:?}", data.len()),
            ));
        }
        Ok(Self::from_storage(Storage::from_vec(data), shape))
    }

    /// Builds a tensor of any dtype from f64 values (handy in tests and fixtures).
    pub fn from_f64s(data: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
        any_dispatch!(dtype, T => Tensor::from_vec(data.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>(), shape))
    }

    pub fn scalar(v: f64, dtype: DType) -> Result<Tensor> {
        Self::from_f64s(&[v], &[], dtype)
    }

    pub fn full(shape: &[usize], v: f64, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        any_dispatch!(dtype, T => Tensor::from_vec(vec![T::from_f64(v); n], shape))
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Result<Tensor> {
        Self::full(shape, 0.0, dtype)
    }

    pub fn ones(shape: &[usize], dtype: DType) -> Result<Tensor> {
        Self::full(shape, 1.0, dtype)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Self::zeros(self.shape(), self.dtype())
    }

    /// `[start, start+step, ...)` below `end`.
    pub fn arange(start: f64, end: f64, step: f64, dtype: DType) -> Result<Tensor> {
        if step == 0.0 || (end - start) / step < 0.0 {
            return Err(Error::msg(format!(
                "arange: empty or infinite range {start}..{end} step {step}"
            )));
        }
        let n = ((end - start) / step).ceil() as usize;
        let v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
        Self::from_f64s(&v, &[n], dtype)
    }

    /// Uniform in [lo, hi).
    pub fn rand(shape: &[usize], lo: f64, hi: f64, dtype: DType, rng: &mut Rng) -> Result<Tensor> {
        Self::generate(shape, dtype, rng, move |r| lo + (hi - lo) * r.uniform())
    }

    /// Normal with mean 0 and standard deviation `std`.
    pub fn randn(shape: &[usize], std: f64, dtype: DType, rng: &mut Rng) -> Result<Tensor> {
        Self::generate(shape, dtype, rng, move |r| std * r.normal())
    }

    /// Fills a tensor from `draw`. Small tensors take values straight from `rng`; large ones
    /// (more than 2^20 elements) take one seed from it and fill 2^20-element chunks in
    /// parallel, chunk i from `Rng::new(seed + i)` — the same numbers on every run and
    /// machine either way.
    fn generate(
        shape: &[usize],
        dtype: DType,
        rng: &mut Rng,
        draw: impl Fn(&mut Rng) -> f64 + Sync,
    ) -> Result<Tensor> {
        const CHUNK: usize = 1 << 20;
        let n: usize = shape.iter().product();
        any_dispatch!(dtype, T => {
            let v: Vec<T> = if n <= CHUNK {
                (0..n).map(|_| T::from_f64(draw(rng))).collect()
            } else {
                use rayon::prelude::*;
                let seed = rng.next_u64();
                let mut v = vec![T::from_f64(0.0); n];
                v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
                    let mut r = Rng::new(seed.wrapping_add(i as u64));
                    c.iter_mut().for_each(|e| *e = T::from_f64(draw(&mut r)));
                });
                v
            };
            Tensor::from_vec(v, shape)
        })
    }

    // ---------------------------------------------------------------- accessors

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.layout.shape
    }
    /// Alias of `shape()`.
    pub fn dims(&self) -> &[usize] {
        self.shape()
    }
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape().get(d).copied().ok_or_else(|| {
            Error::shape(
                "dim",
                format!("dim {d} out of range for {:?}", self.shape()),
            )
        })
    }
    pub fn rank(&self) -> usize {
        self.shape().len()
    }
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }
    pub fn grad_fn(&self) -> Option<&Arc<Node>> {
        self.0.grad_fn.as_ref()
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }
    pub fn is_leaf(&self) -> bool {
        self.0.grad_fn.is_none()
    }
    /// Whether two tensors are views of one buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// Normalises a possibly negative dim index.
    pub fn normalize_dim(&self, dim: isize, op: &'static str) -> Result<usize> {
        let r = self.rank() as isize;
        let d = if dim < 0 { dim + r } else { dim };
        if d < 0 || d >= r.max(1) {
            return Err(Error::shape(
                op,
                format!("dim {dim} out of range for shape {:?}", self.shape()),
            ));
        }
        Ok(d as usize)
    }

    // ---------------------------------------------------------------- autograd state

    /// A leaf that wants gradients, sharing this tensor's buffer (a parameter).
    pub fn requires_grad_(&self) -> Tensor {
        let t = self.view_with(self.layout().clone());
        let inner = Arc::try_unwrap(t.0).ok().expect("fresh tensor is unique");
        Tensor(Arc::new(TensorInner {
            requires_grad: true,
            ..inner
        }))
    }

    /// The same values, cut from the graph.
    pub fn detach(&self) -> Tensor {
        self.view_with(self.layout().clone())
    }

    /// Gradient accumulated by `backward()`, if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.0.grad.lock().expect("grad lock").clone()
    }

    pub fn zero_grad(&self) {
        *self.0.grad.lock().expect("grad lock") = None;
    }

    pub(crate) fn set_grad(&self, g: Option<Tensor>) {
        *self.0.grad.lock().expect("grad lock") = g;
    }

    // ---------------------------------------------------------------- devices

    pub fn device(&self) -> Device {
        if self.0.storage.read().expect("storage lock").is_cuda() {
            Device::Cuda
        } else {
            Device::Cpu
        }
    }

    pub fn is_cuda(&self) -> bool {
        self.device() == Device::Cuda
    }

    /// A tensor of `len`-element device buffer `buf` with a contiguous `shape`.
    pub fn from_cuda(
        buf: crate::backend::cuda::CudaBuffer,
        dtype: DType,
        shape: &[usize],
    ) -> Tensor {
        let len = shape.iter().product();
        Self::from_storage(
            Storage::new(StorageData::Cuda(CudaStorage { buf, dtype, len })),
            shape,
        )
    }

    /// An uninitialised contiguous device tensor (every element is written by the caller).
    pub fn empty_cuda(shape: &[usize], dtype: DType) -> Result<Tensor> {
        let dev = crate::backend::cuda::device()?;
        let n: usize = shape.iter().product();
        let buf = dev.alloc(n * dtype.size_in_bytes())?;
        Ok(Self::from_cuda(buf, dtype, shape))
    }

    /// A zero-filled tensor on `device`.
    pub fn zeros_on(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Self::zeros(shape, dtype),
            Device::Cuda => {
                let t = Self::empty_cuda(shape, dtype)?;
                let dev = crate::backend::cuda::device()?;
                dev.memset_zero(t.cuda_ptr()?, t.numel() * dtype.size_in_bytes())?;
                Ok(t)
            }
        }
    }

    /// A tensor filled with `v` on `device`.
    pub fn full_on(shape: &[usize], v: f64, dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Self::full(shape, v, dtype),
            Device::Cuda if v == 0.0 => Self::zeros_on(shape, dtype, device),
            Device::Cuda => crate::backend::cuda::ops::fill(shape, v, dtype),
        }
    }

    /// Device address of this view's first element (valid while `self` lives).
    pub fn cuda_ptr(&self) -> Result<u64> {
        let guard = self.0.storage.read().expect("storage lock");
        let c = guard.cuda().ok_or_else(|| {
            Error::msg(format!(
                "internal: cuda_ptr of a cpu tensor {:?}",
                self.shape()
            ))
        })?;
        Ok(c.buf.ptr() + (self.0.layout.offset * self.dtype().size_in_bytes()) as u64)
    }

    /// A copy on `device` (the same tensor if it is already there). Differentiable: the
    /// gradient is copied back.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let from = self.device();
        if from == device {
            return Ok(self.clone());
        }
        let out = match device {
            Device::Cuda => {
                let src = self.contiguous()?;
                let dev = crate::backend::cuda::device()?;
                let t = Self::empty_cuda(self.shape(), self.dtype())?;
                any_dispatch!(self.dtype(), T => src.read::<T, _>(|v| dev.htod(v, t.cuda_ptr()?))??);
                t
            }
            Device::Cpu => {
                let src = self.contiguous()?;
                let dev = crate::backend::cuda::device()?;
                let ptr = src.cuda_ptr()?;
                any_dispatch!(self.dtype(), T => {
                    let mut v = vec![T::from_f64(0.0); self.numel()];
                    dev.dtoh(ptr, &mut v)?;
                    Tensor::from_vec(v, self.shape())?
                })
            }
        };
        Ok(crate::autograd::record(
            "to_device",
            out,
            &[self],
            move |g| Ok(vec![Some(g.to_device(from)?)]),
        ))
    }

    pub fn to_cuda(&self) -> Result<Tensor> {
        self.to_device(Device::Cuda)
    }

    pub fn to_cpu(&self) -> Result<Tensor> {
        self.to_device(Device::Cpu)
    }

    fn cpu_only(&self, what: &str) -> Error {
        Error::msg(format!(
            "{what}: tensor {:?} {} is on cuda; this needs a cpu tensor (use .to_cpu())",
            self.shape(),
            self.dtype()
        ))
    }

    // ---------------------------------------------------------------- data access

    /// Runs `f` on the elements of a contiguous tensor.
    pub fn read<T: WithDType, R>(&self, f: impl FnOnce(&[T]) -> R) -> Result<R> {
        if self.is_cuda() {
            return Err(self.cpu_only("read"));
        }
        if !self.is_contiguous() {
            return Err(Error::msg(format!(
                "internal: read of a non-contiguous tensor {:?}",
                self.shape()
            )));
        }
        let guard = self.0.storage.read().expect("storage lock");
        let all = guard.as_slice::<T>().ok_or_else(|| {
            Error::msg(format!(
                "expected dtype {} but tensor is {}",
                T::DTYPE,
                self.dtype()
            ))
        })?;
        let o = self.0.layout.offset;
        Ok(f(&all[o..o + self.numel()]))
    }

    /// Runs `f` on the whole buffer and the layout (strided access without a copy).
    pub fn read_strided<T: WithDType, R>(&self, f: impl FnOnce(&[T], &Layout) -> R) -> Result<R> {
        if self.is_cuda() {
            return Err(self.cpu_only("read"));
        }
        let guard = self.0.storage.read().expect("storage lock");
        let all = guard.as_slice::<T>().ok_or_else(|| {
            Error::msg(format!(
                "expected dtype {} but tensor is {}",
                T::DTYPE,
                self.dtype()
            ))
        })?;
        Ok(f(all, &self.0.layout))
    }

    /// Whether this handle is the only one to the tensor and its buffer (no clone, no view), and
    /// the tensor a contiguous one of this shape, dtype and device: an in-place change is then
    /// seen by no one else (a gradient accumulated in place, `autograd::record_into`).
    pub fn can_write_in_place(&self, shape: &[usize], dtype: DType, device: Device) -> bool {
        Arc::strong_count(&self.0) == 1
            && Arc::strong_count(&self.0.storage) == 1
            && self.is_contiguous()
            && self.shape() == shape
            && self.dtype() == dtype
            && self.device() == device
    }

    /// Runs `f` on the elements of a contiguous tensor, writable in place. Used by optimisers
    /// on parameters; a view sharing the buffer sees the change.
    pub fn write<T: WithDType, R>(&self, f: impl FnOnce(&mut [T]) -> R) -> Result<R> {
        if self.is_cuda() {
            return Err(self.cpu_only("write"));
        }
        if !self.is_contiguous() {
            return Err(Error::msg(format!(
                "in-place write needs a contiguous tensor, got shape {:?}",
                self.shape()
            )));
        }
        let mut guard = self.0.storage.write().expect("storage lock");
        let dtype = guard.dtype();
        let all = guard.as_mut_slice::<T>().ok_or_else(|| {
            Error::msg(format!("expected dtype {} but tensor is {dtype}", T::DTYPE))
        })?;
        let o = self.0.layout.offset;
        Ok(f(&mut all[o..o + self.numel()]))
    }

    /// Copies `src` (same shape and dtype) into this tensor's buffer in place.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.shape() != self.shape() || src.dtype() != self.dtype() {
            return Err(Error::shape(
                "assign",
                format!(
                    "{:?} {} into {:?} {}",
                    src.shape(),
                    src.dtype(),
                    self.shape(),
                    self.dtype()
                ),
            ));
        }
        if self.is_cuda() {
            let src = src.to_cuda()?.contiguous()?;
            if !self.is_contiguous() {
                return Err(self.cpu_only("assign into a non-contiguous cuda view"));
            }
            let dev = crate::backend::cuda::device()?;
            return dev.dtod(
                src.cuda_ptr()?,
                self.cuda_ptr()?,
                self.numel() * self.dtype().size_in_bytes(),
            );
        }
        let src = src.to_cpu()?.contiguous()?;
        any_dispatch!(self.dtype(), T => {
            let v = src.to_vec::<T>()?;
            self.write::<T, _>(|d| d.copy_from_slice(&v))
        })
    }

    /// Elements in logical (row-major) order, whatever the layout.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        if self.is_cuda() {
            return crate::no_grad(|| self.to_cpu())?.to_vec();
        }
        self.read_strided::<T, _>(|all, layout| {
            if layout.is_contiguous() {
                all[layout.offset..layout.offset + layout.numel()].to_vec()
            } else {
                crate::backend::cpu::gather_strided(all, layout)
            }
        })
    }

    /// Elements converted to f64, any dtype.
    pub fn to_f64s(&self) -> Result<Vec<f64>> {
        any_dispatch!(self.dtype(), T => Ok(self.to_vec::<T>()?.into_iter().map(|v| v.to_f64()).collect()))
    }

    /// The single value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("tensor of shape {:?} is not a scalar", self.shape()),
            ));
        }
        Ok(self.to_f64s()?[0])
    }

    /// Raw little-endian bytes of a contiguous copy.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let t = self.to_cpu()?.contiguous()?;
        let guard = t.0.storage.read().expect("storage lock");
        let sz = t.dtype().size_in_bytes();
        let o = t.0.layout.offset * sz;
        Ok(guard.as_bytes()[o..o + t.numel() * sz].to_vec())
    }
}

impl Tensor {
    /// Non-negative integer values of an i64/u32 tensor (indices, token ids), in logical order.
    pub fn to_indices(&self, op: &'static str) -> Result<Vec<usize>> {
        match self.dtype() {
            DType::I64 => self
                .to_vec::<i64>()?
                .into_iter()
                .map(|v| {
                    usize::try_from(v).map_err(|_| Error::msg(format!("{op}: negative index {v}")))
                })
                .collect(),
            DType::U32 => Ok(self
                .to_vec::<u32>()?
                .into_iter()
                .map(|v| v as usize)
                .collect()),
            d => Err(Error::DType {
                op,
                dtype: d,
                hint: " (indices must be i64 or u32)".into(),
            }),
        }
    }

    /// Nonzero-ness of every element, any dtype (masks).
    pub fn to_mask(&self) -> Result<Vec<bool>> {
        Ok(self.to_f64s()?.into_iter().map(|v| v != 0.0).collect())
    }
}
