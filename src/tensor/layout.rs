//! Shape, strides and offset of a tensor view over its storage. Views (reshape of a
//! contiguous tensor, permute, narrow, broadcast) only build a new `Layout`.

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub shape: Vec<usize>,
    /// Element strides; 0 on broadcast dimensions.
    pub strides: Vec<usize>,
    pub offset: usize,
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Broadcast two shapes with numpy rules (align right, 1 stretches).
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::shape(
                op,
                format!("cannot broadcast {a:?} with {b:?}"),
            ));
        };
    }
    Ok(out)
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Row-major contiguous (size-1 dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// This layout viewed with `shape` (numpy broadcasting; no copy).
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Layout> {
        if shape.len() < self.rank() {
            return Err(Error::shape(
                "broadcast_as",
                format!("cannot broadcast {:?} to {:?}", self.shape, shape),
            ));
        }
        let extra = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for i in 0..shape.len() {
            if i < extra {
                continue;
            }
            let (d, s) = (self.shape[i - extra], self.strides[i - extra]);
            if d == shape[i] {
                strides[i] = s;
            } else if d == 1 {
                strides[i] = 0;
            } else {
                return Err(Error::shape(
                    "broadcast_as",
                    format!("cannot broadcast {:?} to {:?}", self.shape, shape),
                ));
            }
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset,
        })
    }

    /// Storage offset of every element, in row-major logical order.
    pub fn offsets(&self) -> StridedOffsets<'_> {
        StridedOffsets::new(self)
    }

    /// Calls `f(start, stride, len)` for every innermost row, in logical order.
    pub fn for_each_row(&self, mut f: impl FnMut(usize, usize, usize)) {
        if self.rank() == 0 {
            f(self.offset, 1, 1);
            return;
        }
        let last = self.rank() - 1;
        let (len, stride) = (self.shape[last], self.strides[last]);
        if len == 0 || self.numel() == 0 {
            return;
        }
        let outer = Layout {
            shape: self.shape[..last].to_vec(),
            strides: self.strides[..last].to_vec(),
            offset: self.offset,
        };
        for start in outer.offsets() {
            f(start, stride, len);
        }
    }
}

pub struct StridedOffsets<'a> {
    layout: &'a Layout,
    index: Vec<usize>,
    next: Option<usize>,
}

impl<'a> StridedOffsets<'a> {
    fn new(layout: &'a Layout) -> Self {
        let next = if layout.numel() == 0 {
            None
        } else {
            Some(layout.offset)
        };
        StridedOffsets {
            layout,
            index: vec![0; layout.rank()],
            next,
        }
    }
}

impl Iterator for StridedOffsets<'_> {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        let current = self.next?;
        let mut offset = current;
        let mut done = true;
        for d in (0..self.layout.rank()).rev() {
            self.index[d] += 1;
            offset += self.layout.strides[d];
            if self.index[d] < self.layout.shape[d] {
                done = false;
                break;
            }
            offset -= self.layout.strides[d] * self.index[d];
            self.index[d] = 0;
        }
        self.next = if done { None } else { Some(offset) };
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_a_transpose_walk_columns() {
        let l = Layout {
            shape: vec![3, 2],
            strides: vec![1, 3],
            offset: 0,
        };
        assert_eq!(l.offsets().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        assert!(!l.is_contiguous());
        assert!(Layout::contiguous(&[2, 1, 3]).is_contiguous());
    }

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(
            broadcast_shapes("t", &[4, 1, 3], &[2, 1]).unwrap(),
            vec![4, 2, 3]
        );
        assert!(broadcast_shapes("t", &[4, 3], &[2]).is_err());
        let l = Layout::contiguous(&[3]).broadcast_as(&[2, 3]).unwrap();
        assert_eq!(l.offsets().collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2]);
    }
}
