//! The CUDA backend: one device, one context and one stream per process, a caching allocator,
//! NVRTC-compiled kernels (`kernels/*.cu`) and their launches.
//!
//! The driver and NVRTC are loaded at run time (cudarc dynamic loading): building tessera needs
//! no CUDA toolkit, and a machine without a driver gets the error "no CUDA driver found", never
//! a panic. All work goes to one stream, so a freed block can be handed to the next allocation
//! at once: stream order guarantees the old kernels finished with it before new ones start.
//!
//! Kernel argument convention (kernels/common.cuh): pointers are `u64` device addresses
//! (`CUdeviceptr`), sizes and strides `long long` (i64), scalars `float` (f32).

mod alloc;
pub mod compile;
mod cublas;
pub mod flash;
pub mod gemm_tc;
pub mod kernels;
pub mod ops;
mod staging;

pub use alloc::{AllocStats, CudaBuffer};
pub use cublas::version as cublas_version;

use crate::{Error, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The process's CUDA device (ordinal 0).
pub struct CudaDevice {
    ctx: sys::CUcontext,
    pub(crate) stream: sys::CUstream,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub sm_count: i32,
    pub total_mem: usize,
    alloc: Mutex<alloc::Allocator>,
    /// Loaded kernels by file, then name: the function and the dynamic shared memory it has
    /// been allowed so far (a launch asking for more raises the limit once, not every time).
    functions: Mutex<HashMap<&'static str, Kernels>>,
    /// Pinned ring for uploads (made on first use; None when pinning failed or
    /// TESSERA_HTOD_SYNC=1 asks for the synchronising path).
    staging: OnceLock<Option<Mutex<staging::Staging>>>,
}

/// A file's loaded kernels by name: (the function, its dynamic shared-memory limit so far).
type Kernels = HashMap<String, (usize, u32)>;

// SAFETY: the ring's pinned block and events are driver objects used under its mutex.
unsafe impl Send for staging::Staging {}

// The raw handles are process-global driver objects; every use goes through the driver, which
// is thread-safe once the context is current on the calling thread (`bind`).
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

static DEVICE: OnceLock<std::result::Result<CudaDevice, String>> = OnceLock::new();

/// A measurement switch: a value set for the process (`set`, tests and benchmarks), else its
/// environment variable's (a small number, read once: switches are consulted on hot paths such
/// as every GEMM), else none.
pub(crate) struct Switch {
    var: &'static str,
    /// The process value; `UNSET` defers to the environment.
    value: std::sync::atomic::AtomicU8,
    env: OnceLock<Option<u8>>,
}

impl Switch {
    const UNSET: u8 = u8::MAX;

    pub(crate) const fn new(var: &'static str) -> Switch {
        Switch {
            var,
            value: std::sync::atomic::AtomicU8::new(Self::UNSET),
            env: OnceLock::new(),
        }
    }

    /// The process value, else the environment variable read as a number.
    pub(crate) fn get(&self) -> Option<u8> {
        match self.value.load(Ordering::Relaxed) {
            Self::UNSET => *self
                .env
                .get_or_init(|| std::env::var(self.var).ok()?.parse().ok()),
            v => Some(v),
        }
    }

    /// Sets the process value (`None`: back to the environment).
    pub(crate) fn set(&self, v: Option<u8>) {
        let v = v.map_or(Self::UNSET, |v| v.min(Self::UNSET - 1));
        self.value.store(v, Ordering::Relaxed);
    }
}

/// Kernel profiling (`TESSERA_PROFILE=1`): every launch is bracketed by two events; the
/// report sums the GPU time per kernel name.
struct Profile {
    on: bool,
    events: Mutex<Vec<Event>>,
}

/// One profiled launch: its name (with the part of the model), the note its launcher left
/// (`profile_note`: a product's m x k x n and FLOPs), and its two events.
struct Event {
    name: String,
    note: Option<(String, f64)>,
    start: usize,
    end: usize,
}

thread_local! {
    static NOTE: std::cell::RefCell<Option<(String, f64)>> = const { std::cell::RefCell::new(None) };
}

/// While profiling, a note for the next launch on this thread: a label (a product's
/// "m x k x n") and its FLOPs, so the profile can give time and TFLOP/s by shape.
pub fn profile_note(label: impl FnOnce() -> String, flops: f64) {
    if profiling() {
        NOTE.with(|n| *n.borrow_mut() = Some((label(), flops)));
    }
}

/// The note `profile_note` left for the next launch (None when not profiling), taken: a
/// launcher calls it once per launch, whether the launch happens or not.
pub(crate) fn take_note() -> Option<(String, f64)> {
    profiling()
        .then(|| NOTE.with(|n| n.borrow_mut().take()))
        .flatten()
}

fn profile() -> &'static Profile {
    static P: OnceLock<Profile> = OnceLock::new();
    P.get_or_init(|| Profile {
        on: std::env::var("TESSERA_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"),
        events: Mutex::new(Vec::new()),
    })
}

/// Whether `TESSERA_PROFILE` is set.
/// Host-side counters since the process started: launches, stream synchronisations and the
/// wall time the host spent in them (always on: a few relaxed atomic adds).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostStats {
    pub launches: u64,
    pub syncs: u64,
    pub sync_ms: f64,
    /// Wall time inside the driver's launch calls: a few µs each, unless the launch queue is
    /// full and the call waits for the device (the host is ahead). The host's own work is the
    /// rest of its time.
    pub launch_ms: f64,
}

static LAUNCHES: AtomicU64 = AtomicU64::new(0);
static SYNCS: AtomicU64 = AtomicU64::new(0);
/// Launches per kernel name while `count_launches(true)` (tests: which kernel really ran).
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static COUNTS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Starts (or stops) counting launches per kernel name, process-wide; for tests that must know
/// which kernel a product took (a fallback would pass a comparison with the CPU too).
pub fn count_launches(on: bool) {
    COUNTING.store(on, Ordering::Relaxed);
}

/// Launches counted so far (`count_launches`) of kernels whose name satisfies `pick`.
pub fn launches_where(pick: impl Fn(&str) -> bool) -> u64 {
    let counts = COUNTS.lock().expect("launch counts lock");
    counts
        .iter()
        .flatten()
        .filter(|(name, _)| pick(name))
        .map(|(_, n)| n)
        .sum()
}
static SYNC_NS: AtomicU64 = AtomicU64::new(0);
static LAUNCH_NS: AtomicU64 = AtomicU64::new(0);

pub fn host_stats() -> HostStats {
    HostStats {
        launches: LAUNCHES.load(Ordering::Relaxed),
        syncs: SYNCS.load(Ordering::Relaxed),
        sync_ms: SYNC_NS.load(Ordering::Relaxed) as f64 * 1e-6,
        launch_ms: LAUNCH_NS.load(Ordering::Relaxed) as f64 * 1e-6,
    }
}

pub fn profiling() -> bool {
    profile().on
}

/// GPU time per kernel since the last report (or start): (kernel, launches, total ms), the
/// most expensive first. Synchronises the device. Empty unless `TESSERA_PROFILE` is set.
pub fn profile_report() -> Result<Vec<(String, usize, f64)>> {
    Ok(profile_timeline()?.kernels)
}

/// The profiled launches (`profile_timeline`), summed three ways.
pub struct Timeline {
    /// By kernel name (with the part): (name, launches, ms), the largest first.
    pub kernels: Vec<(String, usize, f64)>,
    /// Where the device was outside kernels, by the kernel that came next: (name, gaps, ms).
    pub gaps: Vec<(String, usize, f64)>,
    /// The launches that carried a note (`profile_note`: the products), by name and note:
    /// (name, note, launches, ms, FLOPs), the largest first.
    pub noted: Vec<(String, String, usize, f64, f64)>,
}

/// `profile_report`, where the device was outside kernels (for each kernel, the time from the
/// end of the kernel launched before it to its own start, summed by that kernel's name; a gap
/// is the device waiting for the host, or running a memset or copy, which carry no events),
/// and the noted launches by shape.
pub fn profile_timeline() -> Result<Timeline> {
    let p = profile();
    if !p.on {
        return Ok(Timeline {
            kernels: Vec::new(),
            gaps: Vec::new(),
            noted: Vec::new(),
        });
    }
    device()?.synchronize()?;
    let events = std::mem::take(&mut *p.events.lock().expect("profile lock"));
    let mut by: HashMap<String, (usize, f64)> = HashMap::new();
    let mut gaps: HashMap<String, (usize, f64)> = HashMap::new();
    let mut noted: HashMap<(String, String), (usize, f64, f64)> = HashMap::new();
    let mut prev_end: Option<sys::CUevent> = None;
    for Event {
        name,
        note,
        start,
        end,
    } in &events
    {
        let (a, b) = (*start as sys::CUevent, *end as sys::CUevent);
        // SAFETY: the events were recorded on the stream, which is now idle.
        let ms = unsafe { result::event::elapsed(a, b) }.unwrap_or(0.0) as f64;
        let e = by.entry(name.clone()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += ms;
        if let Some((label, flops)) = note {
            let e = noted
                .entry((name.clone(), label.clone()))
                .or_insert((0, 0.0, 0.0));
            e.0 += 1;
            e.1 += ms;
            e.2 += flops;
        }
        if let Some(pe) = prev_end {
            // SAFETY: as above.
            let gap = unsafe { result::event::elapsed(pe, a) }.unwrap_or(0.0) as f64;
            let g = gaps.entry(name.clone()).or_insert((0, 0.0));
            g.0 += 1;
            g.1 += gap.max(0.0);
        }
        prev_end = Some(b);
    }
    for e in events {
        // SAFETY: destroyed once, after every elapsed time is read.
        unsafe {
            let _ = result::event::destroy(e.start as sys::CUevent);
            let _ = result::event::destroy(e.end as sys::CUevent);
        }
    }
    let sorted = |m: HashMap<String, (usize, f64)>| {
        let mut v: Vec<(String, usize, f64)> =
            m.into_iter().map(|(k, (n, ms))| (k, n, ms)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    };
    let mut noted: Vec<(String, String, usize, f64, f64)> = noted
        .into_iter()
        .map(|((name, label), (n, ms, flops))| (name, label, n, ms, flops))
        .collect();
    noted.sort_by(|a, b| b.3.total_cmp(&a.3));
    Ok(Timeline {
        kernels: sorted(by),
        gaps: sorted(gaps),
        noted,
    })
}

thread_local! {
    static BOUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Msg(format!("cuda: {what}: {e:?}"))
}

/// Whether a CUDA driver and at least one device are present (never panics).
pub fn is_available() -> bool {
    device().is_ok()
}

/// The device, initialised on first use. Errors (no driver, no device) are remembered.
pub fn device() -> Result<&'static CudaDevice> {
    let d = DEVICE
        .get_or_init(init)
        .as_ref()
        .map_err(|e| Error::Msg(e.clone()))?;
    d.bind()?;
    Ok(d)
}

/// For tests: the device, or None after printing why the test is skipped.
pub fn device_or_skip(test: &str) -> Option<&'static CudaDevice> {
    match device() {
        Ok(d) => Some(d),
        Err(e) => {
            // Once per test binary, past the harness's capture: which binary's CUDA checks
            // did not run, and why.
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                let bin = std::env::args()
                    .next()
                    .map(|a| a.rsplit('/').next().unwrap_or("").to_string())
                    .unwrap_or_default();
                let bin = bin.rsplit_once('-').map_or(bin.as_str(), |(b, _)| b);
                skip_note(&format!(
                    "skipped the CUDA checks of {bin} (first: {test}): {e}; its tests pass without running on a GPU"
                ));
            });
            None
        }
    }
}

/// Prints a line to stderr past the test harness's output capture, so `cargo test` shows
/// which CUDA tests skipped.
pub fn skip_note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn init() -> std::result::Result<CudaDevice, String> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver found (libcuda.so could not be loaded)".into());
    }
    let e = |what: &str, err: result::DriverError| format!("cuda: {what}: {err:?}");
    result::init().map_err(|x| e("cuInit", x))?;
    let count = result::device::get_count().map_err(|x| e("device count", x))?;
    if count == 0 {
        return Err("no CUDA device found (the driver reports 0 devices)".into());
    }
    let dev = result::device::get(0).map_err(|x| e("device 0", x))?;
    // SAFETY: dev is a valid device handle; the primary context is retained for the process.
    unsafe {
        let ctx = result::primary_ctx::retain(dev).map_err(|x| e("primary context", x))?;
        result::ctx::set_current(ctx).map_err(|x| e("set context", x))?;
        let attr = |a| result::device::get_attribute(dev, a).map_err(|x| e("attribute", x));
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let total_mem = result::device::total_mem(dev).map_err(|x| e("total memory", x))?;
        let name = result::device::get_name(dev).map_err(|x| e("name", x))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|x| e("stream", x))?;
        BOUND.with(|b| b.set(true));
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            cc: (major, minor),
            sm_count,
            total_mem,
            alloc: Mutex::new(alloc::Allocator::default()),
            functions: Mutex::new(HashMap::new()),
            staging: OnceLock::new(),
        })
    }
}

/// One kernel argument: a pointer to a value that lives until the launch returns (the driver
/// copies argument values at launch).
pub struct Arg<'a>(*mut c_void, std::marker::PhantomData<&'a ()>);

/// Wraps a kernel argument. Pass `u64` for pointers, `i64` for sizes, `f32` for scalars, or a
/// `#[repr(C)]` struct that matches the kernel's parameter type exactly.
pub fn arg<T: Copy>(v: &T) -> Arg<'_> {
    Arg(v as *const T as *mut c_void, std::marker::PhantomData)
}

impl CudaDevice {
    /// Makes the context current on the calling thread (once per thread).
    fn bind(&self) -> Result<()> {
        if !BOUND.with(|b| b.get()) {
            // SAFETY: ctx is the retained primary context.
            unsafe { result::ctx::set_current(self.ctx) }
                .map_err(|e| driver_err("set context", e))?;
            BOUND.with(|b| b.set(true));
        }
        Ok(())
    }

    /// "sm_90"-style architecture name of this device.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }

    /// Allocates `bytes` (rounded up to the allocator's size class). Contents are undefined.
    pub fn alloc(&'static self, bytes: usize) -> Result<CudaBuffer> {
        self.alloc
            .lock()
            .expect("allocator lock")
            .alloc(bytes, self)
    }

    pub(crate) fn release(&self, ptr: u64, class: usize) {
        if let Ok(mut a) = self.alloc.lock() {
            a.release(ptr, class);
        }
    }

    /// Bytes in use, peak and cached by the caching allocator.
    pub fn mem_stats(&self) -> AllocStats {
        self.alloc.lock().expect("allocator lock").stats()
    }

    /// Returns all cached (unused) blocks to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        self.synchronize()?;
        self.alloc.lock().expect("allocator lock").empty_cache()
    }

    /// Resets the peak-bytes gauge to the bytes in use now.
    pub fn reset_peak(&self) {
        self.alloc.lock().expect("allocator lock").reset_peak();
    }

    pub fn synchronize(&self) -> Result<()> {
        let t = std::time::Instant::now();
        // SAFETY: the stream belongs to this context.
        let r = unsafe { result::stream::synchronize(self.stream) }
            .map_err(|e| driver_err("synchronize", e));
        SYNCS.fetch_add(1, Ordering::Relaxed);
        SYNC_NS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    /// Host -> device copy of `src` into `dst` (which must hold at least `src`'s bytes), queued
    /// on the stream: `src` may be dropped on return. Through the pinned staging ring when it
    /// fits (no synchronisation), else synchronising.
    pub fn htod<T: Copy>(&self, src: &[T], dst: u64) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let ring = self.staging.get_or_init(|| {
            let off = std::env::var("TESSERA_HTOD_SYNC").is_ok_and(|v| v == "1");
            (!off)
                .then(|| staging::Staging::new(staging::RING_BYTES))
                .flatten()
                .map(Mutex::new)
        });
        if let Some(ring) = ring {
            // SAFETY: a plain-data slice viewed as its bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(src.as_ptr() as *const u8, std::mem::size_of_val(src))
            };
            // SAFETY: dst holds the bytes (callers' contract); the stream is this context's.
            let queued = unsafe {
                ring.lock()
                    .expect("staging lock")
                    .copy(bytes, dst, self.stream)
            }
            .map_err(|e| driver_err("copy to device", e))?;
            if queued {
                return Ok(());
            }
        }
        // SAFETY: dst is a live allocation of at least size_of_val(src) bytes (callers'
        // contract); the copy completes before we return (synchronous from pageable memory
        // is not guaranteed, so we synchronise).
        unsafe {
            result::memcpy_htod_async(dst, src, self.stream)
                .map_err(|e| driver_err("copy to device", e))?;
        }
        self.synchronize()
    }

    /// Device -> host copy into `dst` (blocks until the stream has finished).
    pub fn dtoh<T: Copy>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: src holds at least size_of_val(dst) bytes; we synchronise before returning.
        unsafe {
            result::memcpy_dtoh_async(dst, src, self.stream)
                .map_err(|e| driver_err("copy to host", e))?;
        }
        self.synchronize()
    }

    /// Device -> device copy of `bytes` (stream-ordered, asynchronous).
    pub fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both ranges are live allocations of at least `bytes`.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream) }
            .map_err(|e| driver_err("device copy", e))
    }

    /// Sets `bytes` bytes at `dst` to zero (stream-ordered).
    pub fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: dst is a live allocation of at least `bytes`.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream) }
            .map_err(|e| driver_err("memset", e))
    }

    /// The function `kernel` of `kernels/<file>`, compiled (or loaded from the disk cache) on
    /// first use, allowed at least `shared_bytes` of dynamic shared memory. A launch looks it up
    /// without allocating (the name is borrowed) and raises the limit only past what it was.
    fn function(
        &self,
        file: &'static str,
        kernel: &str,
        shared_bytes: u32,
    ) -> Result<sys::CUfunction> {
        let mut functions = self.functions.lock().expect("functions lock");
        let loaded = functions.get(file).and_then(|m| m.get(kernel)).copied();
        let (f, allowed) = match loaded {
            Some((f, allowed)) => (f as sys::CUfunction, allowed),
            None => {
                let module = self.module(file)?;
                let name = CString::new(kernel).expect("kernel name");
                // SAFETY: module is a loaded module of this context.
                let f = unsafe { result::module::get_function(module, name) }.map_err(|e| {
                    Error::Msg(format!(
                        "cuda: kernel {kernel} not found in kernels/{file}: {e:?}"
                    ))
                })?;
                (f, 48 * 1024)
            }
        };
        if shared_bytes > allowed {
            // SAFETY: f is a valid function; raising the dynamic shared-memory limit.
            unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(|e| driver_err(kernel, e))?;
        }
        if loaded.is_none() || shared_bytes > allowed {
            functions
                .entry(file)
                .or_default()
                .insert(kernel.to_string(), (f as usize, shared_bytes.max(allowed)));
        }
        Ok(f)
    }

    fn module(&self, file: &'static str) -> Result<sys::CUmodule> {
        static MODULES: OnceLock<Mutex<HashMap<&'static str, usize>>> = OnceLock::new();
        let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut guard = modules.lock().expect("modules lock");
        if let Some(&m) = guard.get(file) {
            return Ok(m as sys::CUmodule);
        }
        let cubin = compile::cubin_cached(file, &self.arch())?;
        // SAFETY: cubin is a complete ELF image for this device's architecture.
        let m =
            unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }.map_err(|e| {
                Error::Msg(format!(
                    "cuda: loading kernels/{file} for {}: {e:?}",
                    self.arch()
                ))
            })?;
        guard.insert(file, m as usize);
        Ok(m)
    }

    /// Launches `kernel` from `kernels/<file>` on the stream.
    pub fn launch(
        &self,
        file: &'static str,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &[Arg<'_>],
    ) -> Result<()> {
        // The launcher's note is for this launch, launched or not.
        let note = take_note();
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = self.function(file, kernel, shared_bytes)?;
        let mut params: Vec<*mut c_void> = args.iter().map(|a| a.0).collect();
        self.recorded(kernel, note, || {
            // SAFETY: the argument list matches the kernel's signature (callers' contract,
            // checked by the op tests); all pointers are live device allocations.
            unsafe { result::launch_kernel(f, grid, block, shared_bytes, self.stream, &mut params) }
                .map_err(|e| {
                    Error::Msg(format!("cuda: launching {kernel} (kernels/{file}): {e:?}"))
                })
        })
    }

    /// Issues work on the stream through `issue` (a kernel launch, or a library call such as
    /// cuBLAS's) as one launch named `kernel`: counted (`host_stats`, `count_launches`), its host
    /// time in the launch time, and under `TESSERA_PROFILE` timed between two events and kept
    /// with its launcher's `note` (`take_note`).
    pub(crate) fn recorded(
        &self,
        kernel: &str,
        note: Option<(String, f64)>,
        issue: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        LAUNCHES.fetch_add(1, Ordering::Relaxed);
        if COUNTING.load(Ordering::Relaxed) {
            let mut counts = COUNTS.lock().expect("launch counts lock");
            *counts
                .get_or_insert_with(HashMap::new)
                .entry(kernel.to_string())
                .or_default() += 1;
        }
        // Destroys the profile's events on an error path (no event is left behind).
        let drop_events = |events: &[sys::CUevent]| {
            for &e in events {
                // SAFETY: an event made here, used by nothing after this error.
                let _ = unsafe { result::event::destroy(e) };
            }
        };
        let timed = if profiling() {
            let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
            let a = result::event::create(flags).map_err(|e| driver_err("event", e))?;
            let b = result::event::create(flags).map_err(|e| {
                drop_events(&[a]);
                driver_err("event", e)
            })?;
            // SAFETY: a fresh event recorded on this context's stream.
            unsafe { result::event::record(a, self.stream) }.map_err(|e| {
                drop_events(&[a, b]);
                driver_err("event", e)
            })?;
            Some((a, b))
        } else {
            None
        };
        let t = std::time::Instant::now();
        if let Err(e) = issue() {
            if let Some((a, b)) = timed {
                drop_events(&[a, b]);
            }
            return Err(e);
        }
        LAUNCH_NS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Some((a, b)) = timed {
            // SAFETY: as above.
            unsafe { result::event::record(b, self.stream) }.map_err(|e| {
                drop_events(&[a, b]);
                driver_err("event", e)
            })?;
            // By the part of the model that issued it (`autograd::part`), and whether from a
            // backward: "gemm_... [text mlp, backward]".
            let name = match crate::autograd::current_part() {
                (Some(part), false) => format!("{kernel} [{part}]"),
                (Some(part), true) => format!("{kernel} [{part}, backward]"),
                (None, _) => kernel.to_string(),
            };
            profile().events.lock().expect("profile lock").push(Event {
                name,
                note,
                start: a as usize,
                end: b as usize,
            });
        }
        Ok(())
    }

    /// Times `f` with events on the stream, in milliseconds.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = result::event::create(flags).map_err(|e| driver_err("event", e))?;
        let stop = result::event::create(flags).map_err(|e| driver_err("event", e))?;
        // SAFETY: events and stream belong to this context; destroyed before returning.
        unsafe {
            result::event::record(start, self.stream).map_err(|e| driver_err("event", e))?;
            f()?;
            result::event::record(stop, self.stream).map_err(|e| driver_err("event", e))?;
            result::event::synchronize(stop).map_err(|e| driver_err("event", e))?;
            let ms = result::event::elapsed(start, stop).map_err(|e| driver_err("event", e))?;
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(stop);
            Ok(ms)
        }
    }
}

/// Blocks of `threads` covering `n` items (at least one block is never launched for n = 0).
pub fn blocks_for(n: usize, threads: usize) -> u32 {
    n.div_ceil(threads).min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod switch_tests {
    use super::Switch;

    #[test]
    fn a_process_value_overrides_the_environment() {
        static S: Switch = Switch::new("TESSERA_TEST_SWITCH_UNUSED");
        assert_eq!(S.get(), None, "unset variable");
        S.set(Some(2));
        assert_eq!(S.get(), Some(2));
        S.set(Some(0));
        assert_eq!(S.get(), Some(0));
        S.set(None);
        assert_eq!(S.get(), None, "back to the (unset) environment");
    }
}
