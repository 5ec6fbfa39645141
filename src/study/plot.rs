//! Line charts as PNG, drawn with the tasks' raster library (no plotting crate, no fonts on
//! disk): axes with ticks, one coloured polyline per series, a legend.

use crate::tasks::draw::{draw_text, fill, fill_rect};
use crate::{Error, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 720;
const H: u32 = 440;
const LEFT: i32 = 70;
const RIGHT: i32 = 180;
const TOP: i32 = 40;
const BOTTOM: i32 = 50;

const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Text in the bitmap font; characters it lacks are drawn as small marks ('.' '-') or skipped.
fn label(img: &mut RgbImage, x: i32, y: i32, text: &str, color: Rgb<u8>) {
    let mut cx = x;
    for ch in text.chars() {
        match ch {
            '.' => fill_rect(img, cx + 2, y + 12, 2, 2, color),
            '-' | '_' => fill_rect(img, cx, y + 6, 8, 2, color),
            '/' | ':' => fill_rect(img, cx + 3, y + 2, 2, 10, color),
            c => {
                let _ = draw_text(img, cx, y, &c.to_ascii_uppercase().to_string(), 2, color);
            }
        }
        cx += 12;
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        fill_rect(img, x.round() as i32 - 1, y.round() as i32 - 1, 2, 2, color);
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes a chart of `series` to `path`. `y_range` fixes the y axis (e.g. 0..1 for accuracy).
pub fn line_chart(
    path: &Path,
    title: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let mut img = RgbImage::new(W, H);
    fill(&mut img, Rgb([255, 255, 255]));
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = y_range.unwrap_or_else(|| {
        let (a, b) = pts()
            .filter(|p| p.1.is_finite())
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if a > b {
            (0.0, 1.0)
        } else if a == b {
            (a - 0.5, b + 0.5)
        } else {
            (a, b)
        }
    });
    let (pw, ph) = (
        (W as i32 - LEFT - RIGHT) as f64,
        (H as i32 - TOP - BOTTOM) as f64,
    );
    let sx = |x: f64| LEFT as f64 + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let grey = Rgb([200, 200, 200]);
    let black = Rgb([0, 0, 0]);
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let y = sy(y0 + f * (y1 - y0));
        fill_rect(&mut img, LEFT, y as i32, pw as u32, 1, grey);
        label(&mut img, 4, y as i32 - 7, &tick(y0 + f * (y1 - y0)), black);
        let x = sx(x0 + f * (x1 - x0));
        label(
            &mut img,
            x as i32 - 12,
            H as i32 - BOTTOM + 8,
            &tick(x0 + f * (x1 - x0)),
            black,
        );
    }
    fill_rect(&mut img, LEFT, TOP, 1, ph as u32, black);
    fill_rect(&mut img, LEFT, TOP + ph as i32, pw as u32, 1, black);
    label(&mut img, LEFT, 10, title, black);
    label(
        &mut img,
        LEFT + pw as i32 / 2 - 24,
        H as i32 - 20,
        "step",
        black,
    );
    for (k, s) in series.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let color = Rgb(c);
        let finite: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        for w in finite.windows(2) {
            line(
                &mut img,
                (sx(w[0].0), sy(w[0].1)),
                (sx(w[1].0), sy(w[1].1)),
                color,
            );
        }
        for p in &finite {
            fill_rect(
                &mut img,
                sx(p.0) as i32 - 2,
                sy(p.1) as i32 - 2,
                5,
                5,
                color,
            );
        }
        let ly = TOP + 10 + 22 * k as i32;
        fill_rect(&mut img, W as i32 - RIGHT + 10, ly + 5, 14, 4, color);
        let name: String = s.name.chars().take(12).collect();
        label(&mut img, W as i32 - RIGHT + 30, ly, &name, black);
    }
    img.save(path)
        .map_err(|e| Error::file(path, format!("cannot write PNG: {e}")))
}
