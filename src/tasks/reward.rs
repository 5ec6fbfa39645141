//! Reading a jigsaw completion and scoring it as the paper does:
//! R = w_hit·R_hit + w_acc·R_acc + w_fmt·R_fmt, with R_hit the fraction of pieces placed right,
//! R_acc 1 only when the whole answer is right, R_fmt 1 when the required format holds.
//!
//! Parsing tolerates whitespace anywhere between tokens (a word-level decoder writes
//! `<answer> 2 1 4 3 </answer>`, a grid may be written one row per line) but not wrong
//! content: a wrong count, a repeated or out-of-range index, or any extra word inside the
//! answer makes it unparseable.

use super::jigsaw::{
    Direction, Format, JigsawSample, Question, ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN,
};
use crate::Result;

/// What a parser read from a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<T> {
    /// The answer, when the answer body is well formed.
    pub value: Option<T>,
    /// Whether the completion has the required layout: for Think, exactly
    /// `<think>...</think><answer>...</answer>` and nothing around it (whitespace aside); for
    /// NoThink, exactly `<answer>...</answer>`; for Plain, a well-formed bare answer.
    pub format_ok: bool,
}

/// The answer body of `text` under `format` and whether the layout holds. For the tagged
/// formats the body is read whenever the text has exactly one `<answer>...</answer>`, even when
/// the rest of the layout is wrong (that costs only the format reward).
pub fn extract_answer(text: &str, format: Format) -> (Option<&str>, bool) {
    let text = text.trim();
    if format == Format::Plain {
        return (Some(text), true);
    }
    let once = |tag: &str| text.matches(tag).count() == 1;
    let body = match (text.find(ANSWER_OPEN), text.find(ANSWER_CLOSE)) {
        (Some(open), Some(close)) if once(ANSWER_OPEN) && once(ANSWER_CLOSE) && open < close => {
            Some(&text[open + ANSWER_OPEN.len()..close])
        }
        _ => None,
    };
    let layout_ok = body.is_some()
        && text.ends_with(ANSWER_CLOSE)
        && match format {
            Format::NoThink => {
                text.starts_with(ANSWER_OPEN)
                    && !text.contains(THINK_OPEN)
                    && !text.contains(THINK_CLOSE)
            }
            _ => {
                // <think> ... </think> (whitespace) <answer>
                let reasoning_closed =
                    text.starts_with(THINK_OPEN) && once(THINK_OPEN) && once(THINK_CLOSE);
                reasoning_closed
                    && text
                        .find(THINK_CLOSE)
                        .zip(text.find(ANSWER_OPEN))
                        .is_some_and(|(close, open)| {
                            close < open && text[close + THINK_CLOSE.len()..open].trim().is_empty()
                        })
            }
        };
    (body, layout_ok)
}

/// A full answer: exactly `n` distinct indices in 1..=n separated by whitespace.
pub fn parse_permutation(body: &str, n: usize) -> Option<Vec<usize>> {
    let mut seen = vec![false; n];
    let mut out = Vec::with_capacity(n);
    for word in body.split_whitespace() {
        if !word.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let y: usize = word.parse().ok()?;
        if !(1..=n).contains(&y) || seen[y - 1] {
            return None;
        }
        seen[y - 1] = true;
        out.push(y);
    }
    (out.len() == n).then_some(out)
}

/// A pair answer: one direction name, any case, spaces around its hyphen tolerated
/// (`top - left`).
pub fn parse_direction(body: &str) -> Option<Direction> {
    let joined = body
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(" -", "-")
        .replace("- ", "-")
        .to_ascii_lowercase();
    Direction::from_name(&joined)
}

/// Reads a full answer for a rows x cols puzzle from a completion in `format`.
pub fn parse_answer(text: &str, format: Format, rows: usize, cols: usize) -> Parsed<Vec<usize>> {
    parse_with(text, format, |body| parse_permutation(body, rows * cols))
}

/// Reads a pair answer from a completion in `format`.
pub fn parse_pair_answer(text: &str, format: Format) -> Parsed<Direction> {
    parse_with(text, format, parse_direction)
}

fn parse_with<T>(text: &str, format: Format, parse: impl Fn(&str) -> Option<T>) -> Parsed<T> {
    let (body, layout_ok) = extract_answer(text, format);
    let value = body.and_then(parse);
    // A plain answer has no tags: its format is the answer's own form.
    let format_ok = match format {
        Format::Plain => value.is_some(),
        Format::Think | Format::NoThink => layout_ok,
    };
    Parsed { value, format_ok }
}

/// Weights of the three reward terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardWeights {
    pub hit: f64,
    pub acc: f64,
    pub fmt: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights {
            hit: 1.0,
            acc: 1.0,
            fmt: 1.0,
        }
    }
}

/// The reward terms of one completion and their weighted sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reward {
    /// Fraction of positions answered right (pair: 1 or 0).
    pub hit: f64,
    /// 1 when the whole answer is right.
    pub acc: f64,
    /// 1 when the required format holds.
    pub fmt: f64,
    pub total: f64,
}

/// Scores `completion` against `sample` (its puzzle, question and format). An unparseable
/// answer gets hit 0 and acc 0; the format term is scored on its own.
pub fn reward(completion: &str, sample: &JigsawSample, weights: &RewardWeights) -> Result<Reward> {
    let puzzle = &sample.puzzle;
    let (hit, acc, format_ok) = match sample.question {
        Question::Full => {
            let parsed = parse_answer(completion, sample.format, puzzle.rows, puzzle.cols);
            let hit = match &parsed.value {
                Some(answer) => {
                    let right = answer
                        .iter()
                        .zip(&puzzle.answer)
                        .filter(|(a, b)| a == b)
                        .count();
                    right as f64 / puzzle.pieces() as f64
                }
                None => 0.0,
            };
            let acc = parsed.value.as_ref() == Some(&puzzle.answer);
            (hit, acc as u8 as f64, parsed.format_ok)
        }
        Question::Pair { first, second } => {
            let truth = puzzle.direction(first, second)?;
            let parsed = parse_pair_answer(completion, sample.format);
            let right = (parsed.value == Some(truth)) as u8 as f64;
            (right, right, parsed.format_ok)
        }
    };
    let fmt = format_ok as u8 as f64;
    Ok(Reward {
        hit,
        acc,
        fmt,
        total: weights.hit * hit + weights.acc * acc + weights.fmt * fmt,
    })
}
