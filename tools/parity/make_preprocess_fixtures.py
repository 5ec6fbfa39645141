#!/usr/bin/env python3
"""Writes tests/fixtures/preprocess/: synthetic images and what transformers' slow (PIL)
Qwen2-VL image processor makes of them.

Read by tests/preprocess.rs, which runs `tessera::qwen2_5_vl::preprocess::load_and_preprocess`
on every `<case>.safetensors` here and compares with the tensors inside:

    pixel_values    f32 [N, 1176]   the processor's output for the image
    image_grid_thw  i64 [1, 3]

and metadata `image` (the image file, in this folder), `min_pixels`, `max_pixels`.

Run from the repository root (deterministic: fixed seeds, no network; only the order of the
metadata keys in the safetensors headers varies between runs):

    pip install transformers pillow safetensors numpy
    python3 tools/parity/make_preprocess_fixtures.py

The processor is the slow PIL one: `Qwen2VLImageProcessorPil` in transformers >= 5,
`Qwen2VLImageProcessor` before. Use Pillow >= 13: it picks the order of the two resampling
passes (see `resize_bicubic` in src/qwen2_5_vl/preprocess.rs), older Pillow always goes
horizontal first. The versions used are recorded in each file's metadata. The folder stays under ~3 MB: images are small, and the
768x1024 case is forced down to 84x112 with a small max_pixels.
"""

import os
import struct
import zlib

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

try:
    from transformers import Qwen2VLImageProcessorPil as SlowProcessor
except ImportError:  # transformers 4.x: the un-suffixed class is the PIL one
    from transformers import Qwen2VLImageProcessor as SlowProcessor

OUT = os.path.join("tests", "fixtures", "preprocess")
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384  # 12845056, Qwen2.5-VL's preprocessor_config.json


def noise_rgb(rng, h, w):
    """Uniform noise: every pixel differs from its neighbours, the hardest case for a resampler."""
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def smooth_rgb(h, w, seed):
    """Gradients, sinusoids and hard-edged blocks: compresses well yet has detail at every scale."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / (7.0 + seed) + y / 23.0)
    g = 255.0 * (x + y) / (h + w)
    b = np.where(((x // 37) + (y // 29)) % 2 == 0, 230.0, 20.0)
    b = b + 25.0 * np.cos(np.hypot(x - w / 3, y - h / 2) / 5.0)
    return np.clip(np.stack([r, g, b], -1).round(), 0, 255).astype(np.uint8)


def blocks_rgb(h, w):
    """Linear gradients, hard-edged blocks and 1-px lines: sharp edges for the antialiasing
    filter, yet a few hundred kB as PNG at 768x1024."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255) // (w - 1)
    g = (y * 255) // (h - 1)
    b = np.where(((x // 61) + (y // 47)) % 2 == 0, 235, 15)
    lines = (x % 97 == 0) | (y % 89 == 0)
    r = np.where(lines, 0, r)
    g = np.where(lines, 255, g)
    return np.stack([r, g, b], -1).astype(np.uint8)


def make_images(rng):
    """(case, file name, PIL image or uint16 array, min_pixels, max_pixels). Sizes are h x w."""
    cases = []

    def add(case, ext, image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
        cases.append((case, f"{case}.{ext}", image, min_pixels, max_pixels))

    # Under min_pixels: smart_resize scales up (20x30 -> 56x84, 42x42 -> 56x56).
    add("rgb_20x30", "png", Image.fromarray(noise_rgb(rng, 20, 30), "RGB"))
    add("rgb_42x42", "png", Image.fromarray(noise_rgb(rng, 42, 42), "RGB"))
    # Down in height, up in width (70x98 -> 56x112).
    # Also vertical pass first in Pillow 13 (height shrinks, width grows).
    add("rgb_70x98", "png", Image.fromarray(noise_rgb(rng, 70, 98), "RGB"))
    # Already a multiple of 28: PIL copies, no resampling.
    add("rgb_56x84_identity", "png", Image.fromarray(noise_rgb(rng, 56, 84), "RGB"))
    # Extreme aspect ratios (30x600 -> 28x588, 600x36 -> 588x28).
    add("wide_30x600", "png", Image.fromarray(smooth_rgb(30, 600, 1), "RGB"))
    add("tall_600x36", "png", Image.fromarray(smooth_rgb(600, 36, 2), "RGB"))
    # Partial transparency, every alpha from 0 to 255 present: composited on white.
    rgba = np.concatenate([noise_rgb(rng, 64, 80), np.zeros((64, 80, 1), np.uint8)], -1)
    rgba[..., 3] = rng.integers(0, 256, size=(64, 80), dtype=np.uint8)
    rgba[:8, :, 3] = 0
    rgba[8:16, :, 3] = 255
    add("rgba_64x80", "png", Image.fromarray(rgba, "RGBA"))
    # Grayscale (mode L) -> RGB by replication.
    add("gray_50x60", "png", Image.fromarray(noise_rgb(rng, 50, 60)[..., 0], "L"))
    # Palette (mode P), without and with a transparent index (tRNS chunk).
    pal = Image.fromarray(smooth_rgb(45, 75, 3), "RGB").quantize(colors=37, method=Image.Quantize.MEDIANCUT)
    add("palette_45x75", "png", pal)
    pal_t = Image.fromarray(noise_rgb(rng, 48, 52), "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    pal_t.info["transparency"] = 3
    add("palette_trns_48x52", "png", pal_t)
    # Lossy codecs: the decoder is part of the comparison here (libjpeg-turbo / libwebp in PIL).
    # JPEG with full-resolution chroma (4:4:4): decoders agree to ~2 levels.
    add("photo_444_60x80", "jpg", Image.fromarray(smooth_rgb(60, 80, 4), "RGB"))
    # JPEG with 4:2:0 chroma, the common case: libjpeg-turbo's "fancy" chroma upsampling and
    # the image crate's differ by several levels at colour edges (a looser tolerance).
    add("photo_420_60x80", "jpg", Image.fromarray(smooth_rgb(60, 80, 4), "RGB"))
    add("photo_60x100", "webp", Image.fromarray(smooth_rgb(60, 100, 5), "RGB"))
    # Custom max_pixels: 300x400 would be 308x392; capped to 12000 px -> 84x112.
    add("max_pixels_300x400", "png", Image.fromarray(smooth_rgb(300, 400, 6), "RGB"), max_pixels=12000)
    # Custom min_pixels: 40x50 -> 84x112 (beta = 2).
    add("min_pixels_40x50", "png", Image.fromarray(noise_rgb(rng, 40, 50), "RGB"), min_pixels=8000)
    # A photo-sized input, forced down ~9x (antialiased support ~18 px): 768x1024 -> 84x112.
    add("large_768x1024", "png", Image.fromarray(blocks_rgb(768, 1024), "RGB"), max_pixels=28 * 28 * 16)
    # Grey + alpha (mode LA), composited on white; 28x30 -> 28x28 with min_pixels 784.
    la = np.stack([noise_rgb(rng, 28, 30)[..., 0], rng.integers(0, 256, (28, 30), dtype=np.uint8)], -1)
    add("gray_alpha_28x30", "png", Image.fromarray(la, "LA"), min_pixels=784)
    # 16 bits per channel. PIL keeps the high byte of 16-bit RGB; 16-bit grey opens as mode
    # I;16, whose conversion to RGB clips at 255 rather than scaling (pinned as the reference
    # does it). 30x33 -> 28x28 with min_pixels 784.
    add("rgb16_30x33", "png", rng.integers(0, 65536, size=(30, 33, 3), dtype=np.uint16), min_pixels=784)
    grey16 = rng.integers(0, 65536, size=(30, 33), dtype=np.uint16)
    grey16[:10] //= 256  # some values below 256 survive the clipping
    add("gray16_30x33", "png", Image.fromarray(grey16), min_pixels=784)
    # Height loses more than twice what the width does: Pillow 13 runs the vertical pass
    # first (300x120 -> 84x28 under 5000 pixels).
    add("vertical_first_300x120", "png", Image.fromarray(smooth_rgb(300, 120, 8), "RGB"), max_pixels=5000)
    return cases


def write_png_rgb16(array, path):
    """16-bit RGB PNG, which PIL cannot write: filter type 0 on every row, big-endian samples."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def save_image(image, path):
    ext = os.path.splitext(path)[1]
    if isinstance(image, np.ndarray):
        write_png_rgb16(image, path)
    elif ext == ".jpg":
        image.save(path, quality=90, subsampling=0 if "_444_" in path else 2)
    elif ext == ".webp":
        image.save(path, quality=85, method=4)
    elif "transparency" in image.info:
        image.save(path, transparency=image.info["transparency"])
    else:
        image.save(path, optimize=True)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20250325)
    for case, file_name, image, min_pixels, max_pixels in make_images(rng):
        path = os.path.join(OUT, file_name)
        save_image(image, path)
        # Process the file as decoded from disk, exactly as a user would load it.
        with Image.open(path) as loaded:
            processor = SlowProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
            out = processor(images=[loaded], return_tensors="np")
        pixel_values = torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))
        grid = torch.from_numpy(np.asarray(out["image_grid_thw"], dtype=np.int64))
        metadata = {
            "image": file_name,
            "min_pixels": str(min_pixels),
            "max_pixels": str(max_pixels),
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
        }
        save_file(
            {"pixel_values": pixel_values, "image_grid_thw": grid},
            os.path.join(OUT, f"{case}.safetensors"),
            metadata=metadata,
        )
        mode = "RGB16" if isinstance(image, np.ndarray) else image.mode
        height, width = Image.open(path).size[::-1]
        print(f"{case:22s} {mode:5s} {height}x{width} -> grid {grid.tolist()[0]}, "
              f"pixel_values {list(pixel_values.shape)}")


if __name__ == "__main__":
    main()
