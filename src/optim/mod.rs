//! Optimisers, gradient clipping and learning-rate schedules.
