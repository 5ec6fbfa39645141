//! Image preprocessing (smart_resize, PIL-matching bicubic, normalise, patchify).
