//! Training and evaluation data by name, as the trainers' `Task`s:
//!
//! - `suite:NAME` — a prior-knowledge suite (colour, shape, count, position, ocr, rank, facts);
//! - `mix:A,B,...` (or `mix:all`) — suites interleaved, example i from suite i mod k;
//! - `jigsaw:RxC` — puzzles on synthetic images; `jigsaw:RxC:DIR` — on a folder of images;
//! - `FILE.jsonl` — records `{image, question, answer, scorer}` (both splits: the whole file).

use crate::rl::config::TrainConfig;
use crate::rl::data::Example;
use crate::rl::task::{Scored, Split, Task};
use crate::tasks::dataset::{load_jsonl, Record};
use crate::tasks::jigsaw::{Format, ImageFolder, JigsawSample, JigsawTask};
use crate::tasks::reward::{reward, RewardWeights};
use crate::tasks::suites::{Suite, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE};
use crate::{Error, Result};
use std::path::Path;

/// Opens the data named by `spec` (see the module doc).
pub fn open(spec: &str, cfg: &TrainConfig) -> Result<Box<dyn Task>> {
    let size = cfg.data.image_size;
    if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&size) {
        return Err(Error::msg(format!(
            "data.image_size {size} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}"
        )));
    }
    if let Some(name) = spec.strip_prefix("suite:") {
        return Ok(Box::new(SuiteTask(suite(name)?, size)));
    }
    if let Some(names) = spec.strip_prefix("mix:") {
        let suites = if names == "all" {
            Suite::ALL.to_vec()
        } else {
            names.split(',').map(suite).collect::<Result<Vec<_>>>()?
        };
        return Ok(Box::new(MixTask {
            name: spec.to_string(),
            suites,
            size,
        }));
    }
    if let Some(rest) = spec.strip_prefix("jigsaw:") {
        let (grid, dir) = match rest.split_once(':') {
            Some((g, d)) => (g, Some(d)),
            None => (rest, None),
        };
        let bad = || Error::msg(format!("data '{spec}': want jigsaw:RxC or jigsaw:RxC:DIR"));
        let (r, c) = grid.split_once('x').ok_or_else(bad)?;
        let (rows, cols) = (
            r.parse::<usize>().map_err(|_| bad())?,
            c.parse::<usize>().map_err(|_| bad())?,
        );
        let format = Format::from_name(&cfg.data.jigsaw_prompt).ok_or_else(|| {
            Error::msg(format!(
                "data.jigsaw_prompt '{}': want think, no-think or plain",
                cfg.data.jigsaw_prompt
            ))
        })?;
        let w = cfg.grpo.reward_weights;
        return Ok(Box::new(Jigsaw {
            task: JigsawTask {
                rows,
                cols,
                format,
                image_size: size,
                ..JigsawTask::tiny()
            },
            folder: dir.map(ImageFolder::open).transpose()?,
            weights: RewardWeights {
                hit: w[0],
                acc: w[1],
                fmt: w[2],
            },
        }));
    }
    if spec.ends_with(".jsonl") {
        let records = load_jsonl(spec)?;
        if records.is_empty() {
            return Err(Error::file(spec, "no records"));
        }
        let name = Path::new(spec)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| spec.to_string());
        return Ok(Box::new(JsonlTask { name, records }));
    }
    Err(Error::msg(format!(
        "data '{spec}': want suite:NAME, mix:A,B,..., jigsaw:RxC[:DIR] or a .jsonl file"
    )))
}

fn suite(name: &str) -> Result<Suite> {
    Suite::from_name(name).ok_or_else(|| {
        let all: Vec<&str> = Suite::ALL.iter().map(|s| s.name()).collect();
        Error::msg(format!(
            "unknown suite '{name}': want one of {}",
            all.join(", ")
        ))
    })
}

fn exact(correct: f64) -> Scored {
    Scored {
        reward: correct,
        correct: correct >= 1.0,
    }
}

/// A suite and the side of its images.
struct SuiteTask(Suite, u32);

impl Task for SuiteTask {
    fn name(&self) -> String {
        self.0.name().to_string()
    }
    fn len(&self, _: Split) -> Option<usize> {
        None
    }
    fn example(&self, split: Split, index: u64) -> Result<Example> {
        let s = self.0.sample_sized(split, index, self.1)?;
        Ok(Example {
            image: s.image,
            question: s.question,
            answer: s.answer,
        })
    }
    fn score(&self, split: Split, index: u64, completion: &str) -> Result<Scored> {
        let s = self.0.sample_sized(split, index, self.1)?;
        Ok(exact(s.scorer.score(completion, &s.answer)))
    }
}

struct MixTask {
    name: String,
    suites: Vec<Suite>,
    size: u32,
}

impl MixTask {
    fn pick(&self, index: u64) -> (SuiteTask, u64) {
        let k = self.suites.len() as u64;
        (
            SuiteTask(self.suites[(index % k) as usize], self.size),
            index / k,
        )
    }
}

impl Task for MixTask {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn len(&self, _: Split) -> Option<usize> {
        None
    }
    fn example(&self, split: Split, index: u64) -> Result<Example> {
        let (t, i) = self.pick(index);
        t.example(split, i)
    }
    fn score(&self, split: Split, index: u64, completion: &str) -> Result<Scored> {
        let (t, i) = self.pick(index);
        t.score(split, i, completion)
    }
}

struct Jigsaw {
    task: JigsawTask,
    folder: Option<ImageFolder>,
    weights: RewardWeights,
}

impl Jigsaw {
    fn sample(&self, split: Split, index: u64) -> Result<JigsawSample> {
        match &self.folder {
            Some(f) => f.sample(&self.task, split, index),
            None => self.task.synthetic_sample(split, index),
        }
    }
}

impl Task for Jigsaw {
    fn name(&self) -> String {
        format!("jigsaw-{}x{}", self.task.rows, self.task.cols)
    }
    fn len(&self, _: Split) -> Option<usize> {
        None
    }
    fn example(&self, split: Split, index: u64) -> Result<Example> {
        let s = self.sample(split, index)?;
        Ok(Example {
            image: Some(s.puzzle.shuffled.clone()),
            question: s.prompt.clone(),
            answer: s.target(),
        })
    }
    fn score(&self, split: Split, index: u64, completion: &str) -> Result<Scored> {
        let s = self.sample(split, index)?;
        let r = reward(completion, &s, &self.weights)?;
        Ok(Scored {
            reward: r.total,
            correct: r.acc >= 1.0,
        })
    }
}

struct JsonlTask {
    name: String,
    records: Vec<Record>,
}

impl JsonlTask {
    fn record(&self, index: u64) -> &Record {
        &self.records[index as usize % self.records.len()]
    }
}

impl Task for JsonlTask {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn len(&self, _: Split) -> Option<usize> {
        Some(self.records.len())
    }
    fn example(&self, _: Split, index: u64) -> Result<Example> {
        let r = self.record(index);
        Ok(Example {
            image: r.load_image()?,
            question: r.question.clone(),
            answer: r.answer.clone(),
        })
    }
    fn score(&self, _: Split, index: u64, completion: &str) -> Result<Scored> {
        let r = self.record(index);
        Ok(exact(r.scorer.score(completion, &r.answer)))
    }
}
