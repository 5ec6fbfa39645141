//! A pinned host ring for host -> device copies that need no stream synchronisation.
//!
//! A copy from pageable memory must finish reading its source before the call returns, which
//! `CudaDevice::htod` used to get by synchronising the stream: every upload (rope tables,
//! masks, segment bounds, labels) drained the GPU's queue, and the GPU then idled while the
//! host caught up (33 synchronisations per step of the 3B benchmark). Here the source is first
//! copied into pinned memory, the device copy is queued from there (truly asynchronous), and an
//! event marks when that region of the ring may be written again. Uploads larger than half the
//! ring take the synchronising path.

use cudarc::driver::{result, sys};
use std::collections::VecDeque;

/// Bytes of pinned memory in the ring.
pub(super) const RING_BYTES: usize = 32 << 20;

pub(super) struct Staging {
    base: *mut u8,
    cap: usize,
    head: usize,
    /// Copies in flight, oldest first: [start, end) of the ring and the event after the copy.
    pending: VecDeque<(usize, usize, sys::CUevent)>,
}

impl Staging {
    /// A ring of `cap` pinned bytes; None when the driver cannot pin that much.
    pub(super) fn new(cap: usize) -> Option<Staging> {
        // SAFETY: plain pinned allocation in the current context, freed in Drop.
        let p = unsafe { result::malloc_host(cap, 0) }.ok()?;
        Some(Staging {
            base: p as *mut u8,
            cap,
            head: 0,
            pending: VecDeque::new(),
        })
    }

    /// Queues the copy of `src` to device address `dst` on `stream` through the ring. Returns
    /// Ok(false), doing nothing, when `src` is larger than half the ring.
    ///
    /// # Safety
    /// `dst` must be a live device allocation of at least `src.len()` bytes, and `stream` a
    /// stream of the current context.
    pub(super) unsafe fn copy(
        &mut self,
        src: &[u8],
        dst: u64,
        stream: sys::CUstream,
    ) -> Result<bool, result::DriverError> {
        let n = src.len();
        if n > self.cap / 2 {
            return Ok(false);
        }
        // Finished copies free their regions (events complete in stream order).
        while let Some(&(_, _, ev)) = self.pending.front() {
            if result::event::query(ev).is_err() {
                break;
            }
            self.pending.pop_front();
            let _ = result::event::destroy(ev);
        }
        // 16-byte aligned regions; wrap to the start when the tail is too short.
        let start = if self.head + n <= self.cap {
            self.head
        } else {
            0
        };
        let end = start + n;
        // Wait for the copies still reading bytes of [start, end) (and the older ones).
        if let Some(last) = self
            .pending
            .iter()
            .rposition(|&(s, e, _)| s < end && start < e)
        {
            for _ in 0..=last {
                let (_, _, ev) = self.pending.pop_front().expect("pending copy");
                result::event::synchronize(ev)?;
                let _ = result::event::destroy(ev);
            }
        }
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(start), n);
        let staged = std::slice::from_raw_parts(self.base.add(start) as *const u8, n);
        result::memcpy_htod_async(dst, staged, stream)?;
        let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        result::event::record(ev, stream)?;
        self.pending.push_back((start, end, ev));
        self.head = end.next_multiple_of(16).min(self.cap);
        Ok(true)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the events and the pinned block belong to this ring; waiting on the events
        // first means no copy still reads the block.
        unsafe {
            for (_, _, ev) in self.pending.drain(..) {
                let _ = result::event::synchronize(ev);
                let _ = result::event::destroy(ev);
            }
            let _ = result::free_host(self.base as *mut std::ffi::c_void);
        }
    }
}
