//! Caching allocator: freed blocks go to a free list keyed by size class and are handed to the
//! next request of that class without a driver call. Size classes: multiples of 512 bytes up
//! to 1 MiB, then multiples of 2 MiB (large tensors waste at most 2 MiB each). When the driver
//! runs out of memory the cache is emptied and the allocation tried once more.

use super::CudaDevice;
use crate::{Error, Result};
use cudarc::driver::result;
use std::collections::HashMap;

const SMALL: usize = 512;
const LARGE: usize = 2 << 20;

fn size_class(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b <= (1 << 20) {
        b.div_ceil(SMALL) * SMALL
    } else {
        b.div_ceil(LARGE) * LARGE
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AllocStats {
    /// Bytes held by live buffers (size-class rounded).
    pub in_use: usize,
    /// Highest `in_use` since start or the last `reset_peak`.
    pub peak: usize,
    /// Bytes held in the free lists.
    pub cached: usize,
    /// Driver allocations made (cache misses).
    pub driver_allocs: usize,
}

#[derive(Default)]
pub(super) struct Allocator {
    free: HashMap<usize, Vec<u64>>,
    stats: AllocStats,
}

/// A device allocation. Returned to the allocator's cache when dropped.
pub struct CudaBuffer {
    ptr: u64,
    class: usize,
    device: &'static CudaDevice,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuffer({:#x}, {} bytes)", self.ptr, self.class)
    }
}

impl CudaBuffer {
    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Bytes reserved (the size class, >= the requested bytes).
    pub fn capacity(&self) -> usize {
        self.class
    }
    pub fn device(&self) -> &'static CudaDevice {
        self.device
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        self.device.release(self.ptr, self.class);
    }
}

impl Allocator {
    pub(super) fn alloc(
        &mut self,
        bytes: usize,
        device: &'static CudaDevice,
    ) -> Result<CudaBuffer> {
        let class = size_class(bytes);
        let ptr = match self.free.get_mut(&class).and_then(|v| v.pop()) {
            Some(p) => {
                self.stats.cached -= class;
                p
            }
            None => {
                // SAFETY: plain device allocation in the current context.
                let p = match unsafe { result::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(_) => {
                        device.synchronize()?;
                        self.empty_cache()?;
                        unsafe { result::malloc_sync(class) }.map_err(|e| {
                            let (free, total) = result::mem_get_info().unwrap_or((0, 0));
                            Error::Msg(format!(
                                "cuda: out of memory allocating {} MiB ({} MiB in use by tessera, \
                                 {} of {} MiB free on the device): {e:?}",
                                class >> 20,
                                self.stats.in_use >> 20,
                                free >> 20,
                                total >> 20
                            ))
                        })?
                    }
                };
                self.stats.driver_allocs += 1;
                p
            }
        };
        self.stats.in_use += class;
        self.stats.peak = self.stats.peak.max(self.stats.in_use);
        Ok(CudaBuffer { ptr, class, device })
    }

    pub(super) fn release(&mut self, ptr: u64, class: usize) {
        self.stats.in_use -= class;
        self.stats.cached += class;
        self.free.entry(class).or_default().push(ptr);
    }

    pub(super) fn empty_cache(&mut self) -> Result<()> {
        for (_, ptrs) in self.free.drain() {
            for p in ptrs {
                // SAFETY: p came from malloc_sync and is not referenced by any live buffer.
                unsafe { result::free_sync(p) }
                    .map_err(|e| Error::Msg(format!("cuda: free: {e:?}")))?;
            }
        }
        self.stats.cached = 0;
        Ok(())
    }

    pub(super) fn stats(&self) -> AllocStats {
        self.stats
    }

    pub(super) fn reset_peak(&mut self) {
        self.stats.peak = self.stats.in_use;
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class((5 << 20) + 3), 6 << 20);
    }
}
