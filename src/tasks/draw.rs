//! A tiny raster library on `image::RgbImage`: fills, rectangles, circles, triangles, ramps and
//! a built-in 5x7 bitmap font. Deterministic and without anti-aliasing, so a generated image
//! is the same bytes on every machine.
//!
//! Coordinates are pixels, x to the right and y down, as `i32` so shapes may hang over the
//! border: everything is clipped to the image.

use image::{Rgb, RgbImage};

use crate::{Error, Result};

/// Width and height of one glyph of the built-in font, in font pixels (before scaling).
pub const GLYPH_WIDTH: u32 = 5;
pub const GLYPH_HEIGHT: u32 = 7;
/// Blank font pixels between two glyphs.
pub const GLYPH_SPACING: u32 = 1;

/// Sets every pixel.
pub fn fill(img: &mut RgbImage, color: Rgb<u8>) {
    for pixel in img.pixels_mut() {
        *pixel = color;
    }
}

/// Sets `(x, y)` when it lies inside the image.
fn put(img: &mut RgbImage, x: i32, y: i32, color: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, color);
    }
}

/// Filled axis-aligned rectangle with top-left corner `(x, y)`, `width` x `height` pixels.
pub fn fill_rect(img: &mut RgbImage, x: i32, y: i32, width: u32, height: u32, color: Rgb<u8>) {
    for py in y..y + height as i32 {
        for px in x..x + width as i32 {
            put(img, px, py, color);
        }
    }
}

/// Filled circle: every pixel whose distance to the centre is at most `radius`.
pub fn fill_circle(img: &mut RgbImage, cx: i32, cy: i32, radius: u32, color: Rgb<u8>) {
    let r = radius as i32;
    for py in cy - r..=cy + r {
        for px in cx - r..=cx + r {
            let (dx, dy) = (px - cx, py - cy);
            if dx * dx + dy * dy <= r * r {
                put(img, px, py, color);
            }
        }
    }
}

/// Filled triangle: every pixel whose centre lies inside or on the edges of the triangle
/// (either winding order).
pub fn fill_triangle(img: &mut RgbImage, corners: [(i32, i32); 3], color: Rgb<u8>) {
    // Work in doubled coordinates so pixel centres (x + 0.5) are integers.
    let doubled = corners.map(|(x, y)| (2 * x as i64, 2 * y as i64));
    // Twice the signed area of (a, b, p): positive on one side of the edge a -> b.
    let edge = |a: (i64, i64), b: (i64, i64), p: (i64, i64)| {
        (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0)
    };
    let [a, b, c] = doubled;
    let x_min = corners.iter().map(|p| p.0).min().unwrap_or(0);
    let x_max = corners.iter().map(|p| p.0).max().unwrap_or(0);
    let y_min = corners.iter().map(|p| p.1).min().unwrap_or(0);
    let y_max = corners.iter().map(|p| p.1).max().unwrap_or(0);
    for py in y_min..=y_max {
        for px in x_min..=x_max {
            let p = (2 * px as i64 + 1, 2 * py as i64 + 1);
            let (e0, e1, e2) = (edge(a, b, p), edge(b, c, p), edge(c, a, p));
            let inside = (e0 >= 0 && e1 >= 0 && e2 >= 0) || (e0 <= 0 && e1 <= 0 && e2 <= 0);
            if inside {
                put(img, px, py, color);
            }
        }
    }
}

/// Linear blend of two colours, `t` in [0, 1].
pub fn mix(a: Rgb<u8>, b: Rgb<u8>, t: f64) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    Rgb(std::array::from_fn(|i| {
        (a.0[i] as f64 * (1.0 - t) + b.0[i] as f64 * t).round() as u8
    }))
}

/// Rows blend from `top` (first row) to `bottom` (last row).
pub fn vertical_ramp(img: &mut RgbImage, top: Rgb<u8>, bottom: Rgb<u8>) {
    let height = img.height();
    for y in 0..height {
        let color = mix(top, bottom, ramp_position(y, height));
        for x in 0..img.width() {
            img.put_pixel(x, y, color);
        }
    }
}

/// Columns blend from `left` (first column) to `right` (last column).
pub fn horizontal_ramp(img: &mut RgbImage, left: Rgb<u8>, right: Rgb<u8>) {
    let width = img.width();
    for x in 0..width {
        let color = mix(left, right, ramp_position(x, width));
        for y in 0..img.height() {
            img.put_pixel(x, y, color);
        }
    }
}

/// Position of pixel `i` along a ramp of `n` pixels: 0 at the first, 1 at the last.
fn ramp_position(i: u32, n: u32) -> f64 {
    if n <= 1 {
        0.0
    } else {
        i as f64 / (n - 1) as f64
    }
}

/// HSV to RGB; hue in turns (0 red, 1/3 green, 2/3 blue, wrapping), saturation and value in
/// [0, 1].
pub fn hsv(hue: f64, saturation: f64, value: f64) -> Rgb<u8> {
    let h = hue.rem_euclid(1.0) * 6.0;
    let (s, v) = (saturation.clamp(0.0, 1.0), value.clamp(0.0, 1.0));
    let sector = h.floor();
    let f = h - sector;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match sector as u32 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    let byte = |c: f64| (c * 255.0).round() as u8;
    Rgb([byte(r), byte(g), byte(b)])
}

/// Rows of the glyph for `c` (digits and letters, either case; space is blank), 5 bits a row,
/// the most significant of the 5 on the left.
fn glyph(c: char) -> Option<[u8; 7]> {
    let rows = match c.to_ascii_uppercase() {
        ' ' => [0, 0, 0, 0, 0, 0, 0],
        '0' => [
            0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110,
        ],
        '1' => [
            0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
        '2' => [
            0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111,
        ],
        '3' => [
            0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110,
        ],
        '4' => [
            0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010,
        ],
        '5' => [
            0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110,
        ],
        '6' => [
            0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110,
        ],
        '7' => [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000,
        ],
        '8' => [
            0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110,
        ],
        '9' => [
            0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100,
        ],
        'A' => [
            0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
        'B' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110,
        ],
        'C' => [
            0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110,
        ],
        'D' => [
            0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100,
        ],
        'E' => [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111,
        ],
        'F' => [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
        'G' => [
            0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111,
        ],
        'H' => [
            0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
        'I' => [
            0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
        'J' => [
            0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100,
        ],
        'K' => [
            0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001,
        ],
        'L' => [
            0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111,
        ],
        'M' => [
            0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001,
        ],
        'N' => [
            0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001,
        ],
        'O' => [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
        'P' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
        'Q' => [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101,
        ],
        'R' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001,
        ],
        'S' => [
            0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110,
        ],
        'T' => [
            0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100,
        ],
        'U' => [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
        'V' => [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100,
        ],
        'W' => [
            0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010,
        ],
        'X' => [
            0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001,
        ],
        'Y' => [
            0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100,
        ],
        'Z' => [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111,
        ],
        _ => return None,
    };
    Some(rows)
}

/// Size in pixels of `text` drawn at `scale`: (width, height).
pub fn text_size(text: &str, scale: u32) -> (u32, u32) {
    let n = text.chars().count() as u32;
    if n == 0 {
        return (0, 0);
    }
    let width = (n * GLYPH_WIDTH + (n - 1) * GLYPH_SPACING) * scale;
    (width, GLYPH_HEIGHT * scale)
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel a `scale` x `scale`
/// square. Letters are drawn upper case. Errors on a character the font lacks.
pub fn draw_text(
    img: &mut RgbImage,
    x: i32,
    y: i32,
    text: &str,
    scale: u32,
    color: Rgb<u8>,
) -> Result<()> {
    if scale == 0 {
        return Err(Error::msg("draw_text: scale must be at least 1"));
    }
    let advance = ((GLYPH_WIDTH + GLYPH_SPACING) * scale) as i32;
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c).ok_or_else(|| {
            Error::msg(format!(
                "draw_text: no glyph for {c:?} in {text:?} (the font has 0-9, A-Z and space)"
            ))
        })?;
        let left = x + i as i32 * advance;
        for (row, bits) in rows.iter().enumerate() {
            for column in 0..GLYPH_WIDTH {
                if bits & (1 << (GLYPH_WIDTH - 1 - column)) != 0 {
                    let px = left + (column * scale) as i32;
                    let py = y + (row as u32 * scale) as i32;
                    fill_rect(img, px, py, scale, scale, color);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(img: &RgbImage, color: Rgb<u8>) -> usize {
        img.pixels().filter(|&&p| p == color).count()
    }

    const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

    #[test]
    fn shapes_cover_the_expected_pixels() {
        let mut img = RgbImage::new(20, 20);
        fill_rect(&mut img, 2, 3, 4, 5, WHITE);
        assert_eq!(count(&img, WHITE), 20);
        // Clipped at the border.
        fill_rect(&mut img, -2, -2, 4, 4, WHITE);
        assert_eq!(count(&img, WHITE), 24);

        let mut img = RgbImage::new(20, 20);
        fill_circle(&mut img, 10, 10, 0, WHITE);
        assert_eq!(count(&img, WHITE), 1);
        fill_circle(&mut img, 10, 10, 1, WHITE);
        assert_eq!(count(&img, WHITE), 5);

        // A right triangle over a 4x4 square covers the diagonal and one side of it.
        let mut img = RgbImage::new(20, 20);
        fill_triangle(&mut img, [(0, 0), (4, 0), (0, 4)], WHITE);
        assert_eq!(count(&img, WHITE), 10);
        let mut reversed = RgbImage::new(20, 20);
        fill_triangle(&mut reversed, [(0, 4), (4, 0), (0, 0)], WHITE);
        assert_eq!(img, reversed);
    }

    #[test]
    fn glyphs_are_distinct_and_text_scales() {
        let chars: Vec<char> = ('0'..='9').chain('A'..='Z').collect();
        let glyphs: Vec<[u8; 7]> = chars.iter().filter_map(|&c| glyph(c)).collect();
        assert_eq!(glyphs.len(), 36);
        for (i, a) in glyphs.iter().enumerate() {
            assert!(
                glyphs[i + 1..].iter().all(|b| a != b),
                "{} repeats",
                chars[i]
            );
        }
        assert_eq!(text_size("CAT", 2), (34, 14));
        let mut img = RgbImage::new(40, 20);
        draw_text(&mut img, 1, 1, "cat", 2, WHITE).expect("draw");
        let mut upper = RgbImage::new(40, 20);
        draw_text(&mut upper, 1, 1, "CAT", 2, WHITE).expect("draw");
        assert_eq!(img, upper);
        // "1" has 10 font pixels; at scale 2 each is 4 image pixels.
        let mut one = RgbImage::new(20, 20);
        draw_text(&mut one, 0, 0, "1", 2, WHITE).expect("draw");
        assert_eq!(count(&one, WHITE), 40);
        assert!(draw_text(&mut one, 0, 0, "a?", 1, WHITE).is_err());
    }

    #[test]
    fn ramps_run_end_to_end() {
        let mut img = RgbImage::new(3, 5);
        vertical_ramp(&mut img, WHITE, Rgb([0, 0, 0]));
        assert_eq!(*img.get_pixel(2, 0), WHITE);
        assert_eq!(*img.get_pixel(0, 4), Rgb([0, 0, 0]));
        assert_eq!(*img.get_pixel(1, 2), Rgb([128, 128, 128]));
        horizontal_ramp(&mut img, Rgb([0, 0, 0]), WHITE);
        assert_eq!(*img.get_pixel(2, 3), WHITE);
        assert_eq!(hsv(0.0, 1.0, 1.0), Rgb([255, 0, 0]));
        assert_eq!(hsv(2.0 / 3.0, 1.0, 1.0), Rgb([0, 0, 255]));
    }
}
