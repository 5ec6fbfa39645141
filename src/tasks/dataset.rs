//! The JSONL format a user brings for prior-knowledge suites, one object per line:
//!
//! ```text
//! {"image": "images/0001.png", "question": "what colour is the shape?", "answer": "red", "scorer": "exact"}
//! {"image": null, "question": "what is 2 plus 3?", "answer": "5"}
//! ```
//!
//! `image` is a path relative to the JSONL file's folder (or absolute), or null for a text-only
//! question; `scorer` is "exact" (the default) or "hit". Blank lines are skipped; unknown keys
//! are ignored. Errors name the file and the line.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::suites::{Scorer, Suite};
use super::Split;
use crate::{Error, Result};

/// One question of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The image file, resolved against the JSONL file's folder; None for text-only.
    pub image: Option<PathBuf>,
    pub question: String,
    pub answer: String,
    pub scorer: Scorer,
}

impl Record {
    /// The decoded image as RGB, or None for a text-only record.
    pub fn load_image(&self) -> Result<Option<RgbImage>> {
        let Some(path) = &self.image else {
            return Ok(None);
        };
        let image =
            image::open(path).map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
        Ok(Some(image.to_rgb8()))
    }
}

/// A line as written in the file.
#[derive(Serialize, Deserialize)]
struct Line {
    image: Option<String>,
    question: String,
    answer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scorer: Option<String>,
}

/// Reads every record of a JSONL file.
pub fn load_jsonl(path: impl AsRef<Path>) -> Result<Vec<Record>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let folder = path.parent().unwrap_or(Path::new(""));
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at_line = |msg: String| Error::file(path, format!("line {}: {msg}", i + 1));
        let parsed: Line = serde_json::from_str(line).map_err(|e| at_line(e.to_string()))?;
        let scorer = match parsed.scorer.as_deref() {
            None => Scorer::Exact,
            Some(name) => Scorer::from_name(name).ok_or_else(|| {
                at_line(format!(
                    "unknown scorer {name:?} (expected \"exact\" or \"hit\")"
                ))
            })?,
        };
        records.push(Record {
            image: parsed.image.map(|image| folder.join(image)),
            question: parsed.question,
            answer: parsed.answer,
            scorer,
        });
    }
    Ok(records)
}

/// Writes `records` as JSONL; image paths under the file's folder are written relative to it.
pub fn write_jsonl(path: impl AsRef<Path>, records: &[Record]) -> Result<()> {
    let path = path.as_ref();
    let folder = path.parent().unwrap_or(Path::new(""));
    let mut text = String::new();
    for record in records {
        let image = match &record.image {
            None => None,
            Some(image) => {
                let relative = image.strip_prefix(folder).unwrap_or(image);
                let relative = relative.to_str().ok_or_else(|| {
                    Error::file(
                        image,
                        "image path is not valid UTF-8, cannot write it to JSON",
                    )
                })?;
                Some(relative.to_string())
            }
        };
        let line = Line {
            image,
            question: record.question.clone(),
            answer: record.answer.clone(),
            scorer: Some(record.scorer.name().to_string()),
        };
        let json = serde_json::to_string(&line)
            .map_err(|e| Error::file(path, format!("cannot encode a record: {e}")))?;
        text.push_str(&json);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

/// Writes samples 0..n of a suite split to `dir`: `{suite}_{split}.jsonl` and the images as
/// `images/{suite}_{split}_{index}.png`. Returns the JSONL path.
pub fn export_suite(
    suite: Suite,
    split: Split,
    n: usize,
    dir: impl AsRef<Path>,
) -> Result<PathBuf> {
    let dir = dir.as_ref();
    let stem = format!("{}_{}", suite.name(), split.name());
    let images = dir.join("images");
    std::fs::create_dir_all(&images)
        .map_err(|e| Error::file(&images, format!("cannot create: {e}")))?;
    let mut records = Vec::with_capacity(n);
    for index in 0..n {
        let sample = suite.sample(split, index as u64);
        let image = match &sample.image {
            None => None,
            Some(pixels) => {
                let file = images.join(format!("{stem}_{index:05}.png"));
                pixels
                    .save(&file)
                    .map_err(|e| Error::file(&file, format!("cannot write image: {e}")))?;
                Some(file)
            }
        };
        records.push(Record {
            image,
            question: sample.question,
            answer: sample.answer,
            scorer: sample.scorer,
        });
    }
    let path = dir.join(format!("{stem}.jsonl"));
    write_jsonl(&path, &records)?;
    Ok(path)
}
