//! Checkpoint and tensor file IO.
