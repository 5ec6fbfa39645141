//! Prior-knowledge suites: small procedurally drawn tasks the tiny base model is pretrained on,
//! and whose accuracy is watched while it learns the jigsaw (the forgetting measure).
//!
//! Each suite stands in for a benchmark of the paper: colour, shape and count (MME-style
//! perception), position (grounding, RefCOCO), ocr (DocVQA), rank (a prior task whose answer is
//! a permutation, sharing the word "order" with the jigsaw prompt) and facts (text-only
//! knowledge, MMMU-style). Images are big, simple and high contrast so each suite is solvable
//! at 56x56 (4 image tokens).
//!
//! Sample i of a split is a pure function of (suite, split, i). Train and eval are disjoint:
//! each split draws from its own seed stream and keeps only candidates whose content hash
//! falls in its bucket (a quarter of the hash space for eval), so no (image, question) pair
//! is in both. Facts is the exception: it asks the same fixed table in both splits, because
//! what it measures is whether memorised knowledge survives.

use image::{Rgb, RgbImage};

use super::draw;
use super::{fnv1a, sample_rng, stream_seed, Split, TINY_IMAGE_SIZE};
use crate::{Error, Result, Rng};

/// Smallest and largest image side the suites draw at.
pub const MIN_IMAGE_SIZE: u32 = 32;
pub const MAX_IMAGE_SIZE: u32 = 1024;

/// How a prediction is compared with the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scorer {
    /// 1 when equal after lower-casing, trimming and collapsing runs of whitespace; else 0.
    Exact,
    /// Fraction of answer words matched position by position (partial credit for sequences
    /// such as permutations), over the longer of the two word counts.
    Hit,
}

impl Scorer {
    pub fn name(self) -> &'static str {
        match self {
            Scorer::Exact => "exact",
            Scorer::Hit => "hit",
        }
    }

    pub fn from_name(name: &str) -> Option<Scorer> {
        [Scorer::Exact, Scorer::Hit]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// Score in [0, 1] of `prediction` against `answer`.
    pub fn score(self, prediction: &str, answer: &str) -> f64 {
        let words =
            |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_lowercase).collect() };
        let (predicted, expected) = (words(prediction), words(answer));
        match self {
            Scorer::Exact => (predicted == expected) as u8 as f64,
            Scorer::Hit => {
                let longest = predicted.len().max(expected.len());
                if longest == 0 {
                    return 1.0;
                }
                let right = predicted
                    .iter()
                    .zip(&expected)
                    .filter(|(p, e)| p == e)
                    .count();
                right as f64 / longest as f64
            }
        }
    }
}

/// One question: an optional image, the question text, the answer and how to score it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: Option<RgbImage>,
    pub question: String,
    pub answer: String,
    pub scorer: Scorer,
}

/// The prior-knowledge suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    Colour,
    Shape,
    Count,
    Position,
    Ocr,
    Rank,
    Facts,
}

const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [50, 80, 230]),
    ("yellow", [235, 215, 40]),
    ("purple", [160, 60, 200]),
    ("orange", [245, 140, 30]),
];

const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

const QUADRANTS: [&str; 4] = ["top-left", "top-right", "bottom-left", "bottom-right"];

const OCR_WORDS: [&str; 12] = [
    "cat", "dog", "sun", "sky", "box", "cup", "tree", "fish", "bird", "moon", "star", "ship",
];

/// A made-up world plus small arithmetic: the text-only knowledge the base memorises.
const FACTS: [(&str, &str); 20] = [
    ("what is 2 plus 3?", "5"),
    ("what is 4 plus 4?", "8"),
    ("what is 1 plus 1?", "2"),
    ("what is 3 plus 6?", "9"),
    ("what is 7 minus 2?", "5"),
    ("what is 9 minus 5?", "4"),
    ("what is 6 minus 6?", "0"),
    ("what is 2 times 3?", "6"),
    ("what is 2 times 4?", "8"),
    ("what is 3 times 3?", "9"),
    ("what is the capital of vell?", "dorn"),
    ("what is the capital of tarsk?", "ulm"),
    ("what is the capital of brio?", "kest"),
    ("what colour is the sea of vell?", "green"),
    ("what colour is the sky of tarsk?", "red"),
    ("how many moons does brio have?", "3"),
    ("how many moons does vell have?", "1"),
    ("which animal rules tarsk?", "fox"),
    ("which animal rules brio?", "owl"),
    ("which animal rules vell?", "cat"),
];

const COLOUR_QUESTION: &str = "what colour is the shape?";
const SHAPE_QUESTION: &str = "what shape is this?";
const COUNT_QUESTION: &str = "how many shapes are there?";
const POSITION_QUESTION: &str = "where is the shape?";
const OCR_QUESTION: &str = "what does the text say?";
const RANK_QUESTION: &str = "order the 4 parts of this image from brightest to darkest.";
/// The rank question in the 2x2 jigsaw prompt's words (`jigsaw::Question::prompt`, plain
/// format): the base learns to answer that layout of prompt with a permutation, so GRPO on the
/// jigsaw starts from well-formed answers (the format prior a real base model brings).
const RANK_QUESTION_JIGSAW_WORDS: &str = "the 2 by 2 parts of this image are shuffled. parts are numbered 1 to 4, \
     left to right, top to bottom. order the parts from brightest to darkest. give only the answer.";

impl Suite {
    pub const ALL: [Suite; 7] = [
        Suite::Colour,
        Suite::Shape,
        Suite::Count,
        Suite::Position,
        Suite::Ocr,
        Suite::Rank,
        Suite::Facts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Suite::Colour => "colour",
            Suite::Shape => "shape",
            Suite::Count => "count",
            Suite::Position => "position",
            Suite::Ocr => "ocr",
            Suite::Rank => "rank",
            Suite::Facts => "facts",
        }
    }

    pub fn from_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether samples carry an image (all but facts).
    pub fn has_image(self) -> bool {
        self != Suite::Facts
    }

    /// Sample `index` of `split` at the tiny preset's 56x56.
    pub fn sample(self, split: Split, index: u64) -> Sample {
        self.draw_split(split, index, TINY_IMAGE_SIZE)
    }

    /// Sample `index` of `split` with `size` x `size` images.
    pub fn sample_sized(self, split: Split, index: u64, size: u32) -> Result<Sample> {
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&size) {
            return Err(Error::msg(format!(
                "suite {}: image size {size} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}",
                self.name()
            )));
        }
        Ok(self.draw_split(split, index, size))
    }

    fn draw_split(self, split: Split, index: u64, size: u32) -> Sample {
        let seed = stream_seed(&format!("{}/{}", self.name(), split.name()));
        let mut rng = sample_rng(seed, index);
        let mut sample = self.draw(&mut rng, size);
        // Keep drawing until the content belongs to this split (expected 4 tries for eval,
        // 1.3 for train; the cap is never reached in practice).
        for _ in 0..1000 {
            if self == Suite::Facts || content_split(&sample) == split {
                break;
            }
            sample = self.draw(&mut rng, size);
        }
        sample
    }

    /// One candidate sample; `size` is within MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE.
    fn draw(self, rng: &mut Rng, size: u32) -> Sample {
        let (image, question, answer) = match self {
            Suite::Colour => {
                let (image, colour, _) = single_shape(rng, size);
                (Some(image), COLOUR_QUESTION.to_string(), colour)
            }
            Suite::Shape => {
                let (image, _, shape) = single_shape(rng, size);
                (Some(image), SHAPE_QUESTION.to_string(), shape)
            }
            Suite::Count => {
                let (image, count) = counted_shapes(rng, size);
                (Some(image), COUNT_QUESTION.to_string(), count.to_string())
            }
            Suite::Position => {
                let (image, quadrant) = shape_in_quadrant(rng, size);
                (Some(image), POSITION_QUESTION.to_string(), quadrant)
            }
            Suite::Ocr => {
                let (image, text) = rendered_text(rng, size);
                (Some(image), OCR_QUESTION.to_string(), text)
            }
            Suite::Rank => {
                let (image, order) = ranked_quadrants(rng, size);
                let question = if rng.below(2) == 0 {
                    RANK_QUESTION
                } else {
                    RANK_QUESTION_JIGSAW_WORDS
                };
                (Some(image), question.to_string(), order)
            }
            Suite::Facts => {
                let (question, answer) = FACTS[rng.below(FACTS.len() as u64) as usize];
                (None, question.to_string(), answer.to_string())
            }
        };
        Sample {
            image,
            question,
            answer,
            scorer: Scorer::Exact,
        }
    }
}

/// Every question and answer word the suites can produce (for the tiny vocabulary).
pub fn vocabulary_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        COLOUR_QUESTION,
        SHAPE_QUESTION,
        COUNT_QUESTION,
        POSITION_QUESTION,
        OCR_QUESTION,
        RANK_QUESTION,
        RANK_QUESTION_JIGSAW_WORDS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.extend(COLOURS.iter().map(|(name, _)| name.to_string()));
    texts.extend(SHAPES.iter().map(|s| s.to_string()));
    texts.extend(QUADRANTS.iter().map(|s| s.to_string()));
    texts.extend(OCR_WORDS.iter().map(|s| s.to_string()));
    for (question, answer) in FACTS {
        texts.push(question.to_string());
        texts.push(answer.to_string());
    }
    texts
}

/// Which split a drawn sample belongs to, from a hash of its image and question.
fn content_split(sample: &Sample) -> Split {
    let mut bytes = sample.question.as_bytes().to_vec();
    if let Some(image) = &sample.image {
        bytes.extend_from_slice(&image.width().to_le_bytes());
        bytes.extend_from_slice(image.as_raw());
    }
    // The low bits of FNV-1a depend only on the low bits of the input bytes (the prime is
    // odd), which correlates them with the drawing (the old `hash % 4` put no triangle in the
    // shape suite's eval split). A multiply carries every bit to the top two.
    if fnv1a(&bytes).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 62 == 0 {
        Split::Eval
    } else {
        Split::Train
    }
}

/// Uniform integer in [lo, hi]; `lo` when the range is empty.
fn between(rng: &mut Rng, lo: i32, hi: i32) -> i32 {
    if hi <= lo {
        lo
    } else {
        lo + rng.below((hi - lo + 1) as u64) as i32
    }
}

/// A dark grey background, so every palette colour stands out.
fn dark_background(rng: &mut Rng, size: u32) -> RgbImage {
    let level = between(rng, 0, 60) as u8;
    let mut img = RgbImage::new(size, size);
    draw::fill(&mut img, Rgb([level; 3]));
    img
}

/// A palette colour with a small random shift per channel; returns (name, colour).
fn palette_colour(rng: &mut Rng) -> (&'static str, Rgb<u8>) {
    let (name, rgb) = COLOURS[rng.below(COLOURS.len() as u64) as usize];
    let shifted = rgb.map(|c| (c as i32 + between(rng, -15, 15)).clamp(0, 255) as u8);
    (name, Rgb(shifted))
}

/// Draws shape `kind` (index into SHAPES) inside the box of half-side `r` around (cx, cy).
fn draw_shape(img: &mut RgbImage, kind: usize, cx: i32, cy: i32, r: i32, color: Rgb<u8>) {
    match kind {
        0 => draw::fill_circle(img, cx, cy, r as u32, color),
        1 => {
            let half = r * 4 / 5;
            let side = (2 * half + 1) as u32;
            draw::fill_rect(img, cx - half, cy - half, side, side, color)
        }
        _ => draw::fill_triangle(
            img,
            [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)],
            color,
        ),
    }
}

/// One big shape of a random kind and colour; returns (image, colour name, shape name).
fn single_shape(rng: &mut Rng, size: u32) -> (RgbImage, String, String) {
    let mut img = dark_background(rng, size);
    let s = size as i32;
    let r = between(rng, s / 5, s / 3);
    let (cx, cy) = (
        between(rng, r + 1, s - r - 2),
        between(rng, r + 1, s - r - 2),
    );
    let kind = rng.below(SHAPES.len() as u64) as usize;
    let (colour, rgb) = palette_colour(rng);
    draw_shape(&mut img, kind, cx, cy, r, rgb);
    (img, colour.to_string(), SHAPES[kind].to_string())
}

/// 1 to 4 shapes, each alone in its own cell of a 3x3 grid so none overlap.
fn counted_shapes(rng: &mut Rng, size: u32) -> (RgbImage, usize) {
    let mut img = dark_background(rng, size);
    let count = 1 + rng.below(4) as usize;
    let mut cells: Vec<i32> = (0..9).collect();
    let cell = size as i32 / 3;
    for i in 0..count {
        // Partial Fisher–Yates: cells[i] becomes a random unused cell.
        let j = i + rng.below((9 - i) as u64) as usize;
        cells.swap(i, j);
        let (x0, y0) = ((cells[i] % 3) * cell, (cells[i] / 3) * cell);
        let r = between(rng, cell / 3, cell / 2 - 1);
        let cx = x0 + between(rng, r + 1, cell - r - 2);
        let cy = y0 + between(rng, r + 1, cell - r - 2);
        let kind = rng.below(SHAPES.len() as u64) as usize;
        let (_, rgb) = palette_colour(rng);
        draw_shape(&mut img, kind, cx, cy, r, rgb);
    }
    (img, count)
}

/// One shape wholly inside a random quadrant; returns (image, quadrant name).
fn shape_in_quadrant(rng: &mut Rng, size: u32) -> (RgbImage, String) {
    let mut img = dark_background(rng, size);
    let quadrant = rng.below(4) as usize;
    let q = size as i32 / 2;
    let (x0, y0) = ((quadrant % 2) as i32 * q, (quadrant / 2) as i32 * q);
    let r = between(rng, q / 3, q / 2 - 2);
    let cx = x0 + between(rng, r + 1, q - r - 2);
    let cy = y0 + between(rng, r + 1, q - r - 2);
    let kind = rng.below(SHAPES.len() as u64) as usize;
    let (_, rgb) = palette_colour(rng);
    draw_shape(&mut img, kind, cx, cy, r, rgb);
    (img, QUADRANTS[quadrant].to_string())
}

/// A word or a digit in the bitmap font, bright on dark, scaled x2 or more; returns (image,
/// the text in lower case).
fn rendered_text(rng: &mut Rng, size: u32) -> (RgbImage, String) {
    let mut img = dark_background(rng, size);
    let text = if rng.below(3) == 0 {
        rng.below(10).to_string()
    } else {
        OCR_WORDS[rng.below(OCR_WORDS.len() as u64) as usize].to_string()
    };
    // Largest scale that fits with a 2-pixel margin; at least 1.
    let room = size.saturating_sub(4);
    let fits = |scale: u32| {
        let (w, h) = draw::text_size(&text, scale);
        w <= room && h <= room
    };
    let max_scale = (1..=16).rev().find(|&s| fits(s)).unwrap_or(1);
    let min_scale = (size / 28).clamp(1, max_scale);
    let scale = between(rng, min_scale as i32, (2 * min_scale).min(max_scale) as i32) as u32;
    let (w, h) = draw::text_size(&text, scale);
    let x = between(rng, 2, size as i32 - w as i32 - 2);
    let y = between(rng, 2, size as i32 - h as i32 - 2);
    let color = draw::hsv(rng.uniform(), 0.3, 1.0);
    // The font covers digits and letters, and the text is one of those.
    let drawn = draw::draw_text(&mut img, x, y, &text, scale, color);
    debug_assert!(drawn.is_ok(), "ocr text {text:?} not drawable");
    (img, text)
}

/// Four uniform grey quadrants of well-separated brightness; the answer lists the quadrants
/// (1..4 in raster order) from brightest to darkest, e.g. `3 1 4 2`.
fn ranked_quadrants(rng: &mut Rng, size: u32) -> (RgbImage, String) {
    // Four of five ladder steps 50 apart, each shifted by at most 8: neighbours differ by 34+.
    let skipped = rng.below(5) as i32;
    let mut levels: Vec<u8> = (0..5)
        .filter(|&step| step != skipped)
        .map(|step| (40 + 50 * step + between(rng, -8, 8)) as u8)
        .collect();
    for i in (1..4).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        levels.swap(i, j);
    }
    let mut img = RgbImage::new(size, size);
    let q = size / 2;
    for (quadrant, &level) in levels.iter().enumerate() {
        let (x0, y0) = ((quadrant as u32 % 2) * q, (quadrant as u32 / 2) * q);
        // The last row and column take the odd pixel of an odd size.
        let w = if quadrant % 2 == 1 { size - q } else { q };
        let h = if quadrant / 2 == 1 { size - q } else { q };
        draw::fill_rect(&mut img, x0 as i32, y0 as i32, w, h, Rgb([level; 3]));
    }
    let mut order: Vec<usize> = (0..4).collect();
    order.sort_by_key(|&quadrant| std::cmp::Reverse(levels[quadrant]));
    let answer: Vec<String> = order
        .iter()
        .map(|quadrant| (quadrant + 1).to_string())
        .collect();
    (img, answer.join(" "))
}
