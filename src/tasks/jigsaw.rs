//! The study's novel task: jigsaw puzzles, in Jigsaw-R1's conventions.
//!
//! An image is cropped so the grid divides it, cut into rows x cols pieces and shuffled.
//! Positions are numbered 1..rows·cols in raster order. The "full" question asks, for the
//! piece now at each position X, its original position Y (the answer is written row by row,
//! e.g. `2 1 4 3` for 2x2); the "pair" question asks where one piece was relative to another
//! in the original image (one of 8 directions). Answers are parsed and rewarded in
//! `tasks::reward`.
//!
//! Prompts are short, use few distinct words (the tiny preset's word-level vocabulary must
//! cover them) and share the instruction "order the ... parts of this image" with the prior
//! rank suite, so a base model that learned rank answers the jigsaw with a digit sequence.

use std::path::{Path, PathBuf};

use image::{imageops, Rgb, RgbImage};

use super::draw;
use super::{sample_rng, Split, TINY_IMAGE_SIZE};
use crate::{Error, Result, Rng};

/// The tags of the think/answer formats (added tokens of the tiny tokenizer).
pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";
pub const ANSWER_OPEN: &str = "<answer>";
pub const ANSWER_CLOSE: &str = "</answer>";

/// Where a piece was relative to another, in image terms (top = smaller row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    TopLeft,
    Top,
    TopRight,
    Left,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Direction {
    pub const ALL: [Direction; 8] = [
        Direction::TopLeft,
        Direction::Top,
        Direction::TopRight,
        Direction::Left,
        Direction::Right,
        Direction::BottomLeft,
        Direction::Bottom,
        Direction::BottomRight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Direction::TopLeft => "top-left",
            Direction::Top => "top",
            Direction::TopRight => "top-right",
            Direction::Left => "left",
            Direction::Right => "right",
            Direction::BottomLeft => "bottom-left",
            Direction::Bottom => "bottom",
            Direction::BottomRight => "bottom-right",
        }
    }

    pub fn from_name(name: &str) -> Option<Direction> {
        Direction::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Direction of cell `a` seen from cell `b`, cells as (row, col); None when they coincide.
    pub fn of(a: (usize, usize), b: (usize, usize)) -> Option<Direction> {
        use std::cmp::Ordering::*;
        let direction = match (a.0.cmp(&b.0), a.1.cmp(&b.1)) {
            (Less, Less) => Direction::TopLeft,
            (Less, Equal) => Direction::Top,
            (Less, Greater) => Direction::TopRight,
            (Equal, Less) => Direction::Left,
            (Equal, Equal) => return None,
            (Equal, Greater) => Direction::Right,
            (Greater, Less) => Direction::BottomLeft,
            (Greater, Equal) => Direction::Bottom,
            (Greater, Greater) => Direction::BottomRight,
        };
        Some(direction)
    }
}

/// How the model is asked to write its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Reasoning in `<think>...</think>`, then `<answer>...</answer>` (the paper's RFT format).
    Think,
    /// Only `<answer>...</answer>`.
    NoThink,
    /// The bare answer, no tags (Jigsaw-R1's plain variant).
    Plain,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Think, Format::NoThink, Format::Plain];

    pub fn name(self) -> &'static str {
        match self {
            Format::Think => "think",
            Format::NoThink => "no-think",
            Format::Plain => "plain",
        }
    }

    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The last sentence of a prompt: how to lay out the answer.
    fn instruction(self) -> &'static str {
        match self {
            Format::Think => "think in <think> </think>, then answer in <answer> </answer>.",
            Format::NoThink => "answer in <answer> </answer>.",
            Format::Plain => "give only the answer.",
        }
    }

    /// The completion that holds `reasoning` (Think only) and the answer `body`.
    pub fn completion(self, reasoning: &str, body: &str) -> String {
        match self {
            Format::Think => format!("<think>{reasoning}</think><answer>{body}</answer>"),
            Format::NoThink => format!("<answer>{body}</answer>"),
            Format::Plain => body.to_string(),
        }
    }
}

/// Which question a task asks about each puzzle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuestionType {
    Full,
    Pair,
}

/// A question about one puzzle; pieces are named by their current (shuffled) positions,
/// 1-based in raster order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Question {
    /// For each position, the original position of the piece now there.
    Full,
    /// Where the piece now at `first` was relative to the piece now at `second`.
    Pair { first: usize, second: usize },
}

impl Question {
    /// A question of type `kind` about `puzzle`; a pair question picks two distinct pieces
    /// with `rng`.
    pub fn draw(kind: QuestionType, puzzle: &Puzzle, rng: &mut Rng) -> Question {
        match kind {
            QuestionType::Full => Question::Full,
            QuestionType::Pair => {
                let n = puzzle.pieces() as u64;
                // Puzzles have at least 2 pieces, so a distinct second piece exists.
                let first = rng.below(n) as usize;
                let second = (first + 1 + rng.below(n - 1) as usize) % n as usize;
                Question::Pair {
                    first: first + 1,
                    second: second + 1,
                }
            }
        }
    }

    /// The prompt text for a rows x cols puzzle.
    pub fn prompt(&self, rows: usize, cols: usize, format: Format) -> String {
        let n = rows * cols;
        let setup = format!(
            "the {rows} by {cols} parts of this image are shuffled. \
             parts are numbered 1 to {n}, left to right, top to bottom."
        );
        let ask = match self {
            Question::Full => "order the parts: for each part, give its original number.".into(),
            Question::Pair { first, second } => {
                let options: Vec<&str> = Direction::ALL.iter().map(|d| d.name()).collect();
                format!(
                    "in the original image, where was part {first} relative to part {second}? \
                     the answer is one of: {}.",
                    options.join(", ")
                )
            }
        };
        format!("{setup} {ask} {}", format.instruction())
    }

    /// A rule-generated reasoning trace that states where each piece came from and derives the
    /// answer (the analogue of off-policy reasoning traces, for SFT in the think format):
    /// full: `part 1 was at row 1 column 2, so 2. part 2 ...`; pair: `part 1 was at row 1
    /// column 2 and part 2 at row 1 column 1.`
    pub fn reasoning(&self, puzzle: &Puzzle) -> Result<String> {
        let cell = |position: usize| {
            let y = puzzle.answer[position - 1] - 1;
            (y / puzzle.cols + 1, y % puzzle.cols + 1)
        };
        match *self {
            Question::Full => {
                let steps: Vec<String> = (1..=puzzle.pieces())
                    .map(|x| {
                        let (row, column) = cell(x);
                        let y = puzzle.answer[x - 1];
                        format!("part {x} was at row {row} column {column}, so {y}.")
                    })
                    .collect();
                Ok(steps.join(" "))
            }
            Question::Pair { first, second } => {
                // Checks the positions.
                puzzle.direction(first, second)?;
                let (first_row, first_column) = cell(first);
                let (second_row, second_column) = cell(second);
                Ok(format!(
                    "part {first} was at row {first_row} column {first_column} \
                     and part {second} at row {second_row} column {second_column}."
                ))
            }
        }
    }

    /// The correct answer body: `2 1 4 3` for full, a direction name for pair.
    pub fn answer(&self, puzzle: &Puzzle) -> Result<String> {
        match *self {
            Question::Full => Ok(puzzle
                .answer
                .iter()
                .map(|y| y.to_string())
                .collect::<Vec<_>>()
                .join(" ")),
            Question::Pair { first, second } => Ok(puzzle.direction(first, second)?.name().into()),
        }
    }
}

/// A shuffled image and the permutation that restores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Puzzle {
    pub rows: usize,
    pub cols: usize,
    /// The source image cropped (centred) so the grid divides it.
    pub original: RgbImage,
    /// The pieces of `original` in their shuffled places.
    pub shuffled: RgbImage,
    /// For each current position X (raster order), the original position Y (1-based) of the
    /// piece now at X.
    pub answer: Vec<usize>,
}

impl Puzzle {
    /// Crops `img` to the grid, cuts it into rows x cols pieces and shuffles them with a
    /// uniformly random permutation (the identity included).
    pub fn new(img: &RgbImage, rows: usize, cols: usize, rng: &mut Rng) -> Result<Puzzle> {
        let original = crop_to_grid(img, rows, cols)?;
        let n = rows * cols;
        // Fisher–Yates over the original positions.
        let mut answer: Vec<usize> = (1..=n).collect();
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            answer.swap(i, j);
        }
        Puzzle::from_cropped(original, rows, cols, &answer)
    }

    /// The puzzle whose shuffle is `answer` (1-based, Jigsaw-R1's convention as in `answer`).
    pub fn with_answer(
        img: &RgbImage,
        rows: usize,
        cols: usize,
        answer: &[usize],
    ) -> Result<Puzzle> {
        Puzzle::from_cropped(crop_to_grid(img, rows, cols)?, rows, cols, answer)
    }

    fn from_cropped(
        original: RgbImage,
        rows: usize,
        cols: usize,
        answer: &[usize],
    ) -> Result<Puzzle> {
        check_permutation(answer, rows * cols)?;
        let sources: Vec<usize> = answer.iter().map(|y| y - 1).collect();
        let shuffled = place_pieces(&original, rows, cols, &sources)?;
        Ok(Puzzle {
            rows,
            cols,
            original,
            shuffled,
            answer: answer.to_vec(),
        })
    }

    pub fn pieces(&self) -> usize {
        self.rows * self.cols
    }

    /// The image rebuilt from `shuffled` by a (possibly wrong) full answer: the piece at
    /// position X goes back to position answer[X]. Equals `original` for the true answer.
    pub fn unshuffle(&self, answer: &[usize]) -> Result<RgbImage> {
        check_permutation(answer, self.pieces())?;
        let mut sources = vec![0; self.pieces()];
        for (x, &y) in answer.iter().enumerate() {
            sources[y - 1] = x;
        }
        place_pieces(&self.shuffled, self.rows, self.cols, &sources)
    }

    /// Where the piece now at position `first` was, in the original image, relative to the
    /// piece now at `second` (positions 1-based).
    pub fn direction(&self, first: usize, second: usize) -> Result<Direction> {
        let n = self.pieces();
        if first == second || !(1..=n).contains(&first) || !(1..=n).contains(&second) {
            return Err(Error::msg(format!(
                "jigsaw pair ({first}, {second}): need two distinct positions in 1..={n}"
            )));
        }
        let cell = |position: usize| {
            let y = self.answer[position - 1] - 1;
            (y / self.cols, y % self.cols)
        };
        Direction::of(cell(first), cell(second))
            .ok_or_else(|| Error::msg("jigsaw: two positions hold the same piece"))
    }
}

/// Errors unless `answer` holds each of 1..=n exactly once.
fn check_permutation(answer: &[usize], n: usize) -> Result<()> {
    let mut seen = vec![false; n];
    for &y in answer {
        if !(1..=n).contains(&y) || seen[y - 1] {
            return Err(Error::msg(format!(
                "jigsaw: {answer:?} is not a permutation of 1..={n}"
            )));
        }
        seen[y - 1] = true;
    }
    if answer.len() != n {
        return Err(Error::msg(format!(
            "jigsaw: {answer:?} has {} entries for {n} pieces",
            answer.len()
        )));
    }
    Ok(())
}

/// The centre of `img` cropped so that `rows` and `cols` divide its height and width.
pub fn crop_to_grid(img: &RgbImage, rows: usize, cols: usize) -> Result<RgbImage> {
    let (width, height) = (img.width() as usize, img.height() as usize);
    if rows == 0 || cols == 0 || rows > height || cols > width || rows * cols < 2 {
        return Err(Error::msg(format!(
            "jigsaw: cannot cut a {width}x{height} image into {rows} rows x {cols} cols \
             (need at least 2 pieces of at least 1 pixel)"
        )));
    }
    let (crop_w, crop_h) = (width - width % cols, height - height % rows);
    let (x, y) = ((width - crop_w) / 2, (height - crop_h) / 2);
    Ok(imageops::crop_imm(img, x as u32, y as u32, crop_w as u32, crop_h as u32).to_image())
}

/// A new image whose cell X (raster order) is cell `sources[X]` of `img` (0-based); `img`'s
/// size must be divisible by the grid.
pub fn place_pieces(
    img: &RgbImage,
    rows: usize,
    cols: usize,
    sources: &[usize],
) -> Result<RgbImage> {
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width % cols != 0 || height % rows != 0 || sources.len() != rows * cols {
        return Err(Error::msg(format!(
            "jigsaw: {width}x{height} image, {rows}x{cols} grid and {} sources do not fit",
            sources.len()
        )));
    }
    let (piece_w, piece_h) = (width / cols, height / rows);
    let corner = |cell: usize| {
        (
            ((cell % cols) * piece_w) as u32,
            ((cell / cols) * piece_h) as u32,
        )
    };
    let mut out = RgbImage::new(width as u32, height as u32);
    for (target, &source) in sources.iter().enumerate() {
        let (sx, sy) = corner(source);
        let piece = imageops::crop_imm(img, sx, sy, piece_w as u32, piece_h as u32).to_image();
        let (tx, ty) = corner(target);
        imageops::replace(&mut out, &piece, tx as i64, ty as i64);
    }
    Ok(out)
}

/// A `size` x `size` image whose pieces can be placed from their own content, like light
/// from above in a photo: brightness falls from top to bottom, hue runs from red (left) to
/// blue (right), and a few random shapes make each image different.
pub fn synthetic_image(rng: &mut Rng, size: u32) -> RgbImage {
    let mut img = RgbImage::new(size, size);
    let hue_start = 0.05 * rng.uniform();
    let value_top = 0.9 + 0.1 * rng.uniform();
    for y in 0..size {
        for x in 0..size {
            let (u, v) = (
                (x as f64 + 0.5) / size as f64,
                (y as f64 + 0.5) / size as f64,
            );
            let color = draw::hsv(hue_start + 0.65 * u, 0.75, value_top - 0.6 * v);
            img.put_pixel(x, y, color);
        }
    }
    let shapes = 2 + rng.below(3);
    for _ in 0..shapes {
        let radius = (size as f64 * (0.06 + 0.06 * rng.uniform())) as u32;
        let cx = rng.below(size as u64) as i32;
        let cy = rng.below(size as u64) as i32;
        let color = Rgb([
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
        ]);
        match rng.below(3) {
            0 => draw::fill_circle(&mut img, cx, cy, radius, color),
            1 => {
                let r = radius as i32;
                draw::fill_rect(&mut img, cx - r, cy - r, 2 * radius, 2 * radius, color)
            }
            _ => {
                let r = radius as i32;
                draw::fill_triangle(
                    &mut img,
                    [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)],
                    color,
                )
            }
        }
    }
    img
}

/// One jigsaw example: the puzzle, the question, the prompt and the correct answer body.
#[derive(Debug, Clone, PartialEq)]
pub struct JigsawSample {
    pub puzzle: Puzzle,
    pub question: Question,
    pub format: Format,
    pub prompt: String,
    /// The answer body: `2 1 4 3` (full) or a direction (pair).
    pub answer: String,
}

impl JigsawSample {
    /// The completion a model that answers right without reasoning writes (the SFT target).
    pub fn target(&self) -> String {
        self.format.completion("", &self.answer)
    }
}

/// How puzzles are made: grid, question, answer format, image size and seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JigsawTask {
    pub rows: usize,
    pub cols: usize,
    pub question: QuestionType,
    pub format: Format,
    /// Side of the synthetic images, in pixels.
    pub image_size: u32,
    pub seed: u64,
}

impl JigsawTask {
    /// The tiny preset's task: 2x2 full puzzles on 56x56 synthetic images, no-think format.
    pub fn tiny() -> JigsawTask {
        JigsawTask {
            rows: 2,
            cols: 2,
            question: QuestionType::Full,
            format: Format::NoThink,
            image_size: TINY_IMAGE_SIZE,
            seed: 0,
        }
    }

    /// Seed of one split's stream; train and eval never share a stream.
    fn split_seed(&self, split: Split) -> u64 {
        super::stream_seed(&format!("jigsaw/{}/{}", split.name(), self.seed))
    }

    /// Puzzle `index` of `split` made from `image`: the shuffle and the question depend only on
    /// (task, split, index).
    pub fn sample_from_image(
        &self,
        image: &RgbImage,
        split: Split,
        index: u64,
    ) -> Result<JigsawSample> {
        let mut rng = sample_rng(self.split_seed(split), index);
        self.make(image, &mut rng)
    }

    /// Puzzle `index` of `split` on a synthetic image (`synthetic_image`).
    pub fn synthetic_sample(&self, split: Split, index: u64) -> Result<JigsawSample> {
        if self.image_size < 2 || self.image_size > 4096 {
            return Err(Error::msg(format!(
                "jigsaw: image_size {} is outside 2..=4096",
                self.image_size
            )));
        }
        let mut rng = sample_rng(self.split_seed(split), index);
        let image = synthetic_image(&mut rng, self.image_size);
        self.make(&image, &mut rng)
    }

    fn make(&self, image: &RgbImage, rng: &mut Rng) -> Result<JigsawSample> {
        let puzzle = Puzzle::new(image, self.rows, self.cols, rng)?;
        let question = Question::draw(self.question, &puzzle, rng);
        let prompt = question.prompt(self.rows, self.cols, self.format);
        let answer = question.answer(&puzzle)?;
        Ok(JigsawSample {
            puzzle,
            question,
            format: self.format,
            prompt,
            answer,
        })
    }
}

/// A folder of source images (png, jpg, jpeg; sorted by file name) to cut into puzzles.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Never empty (checked by `open`).
    files: Vec<PathBuf>,
}

impl ImageFolder {
    pub fn open(dir: impl AsRef<Path>) -> Result<ImageFolder> {
        let dir = dir.as_ref();
        let entries =
            std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| Error::file(dir, format!("cannot list: {e}")))?
                .path();
            let extension = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if path.is_file() && matches!(extension.as_deref(), Some("png" | "jpg" | "jpeg")) {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(Error::file(dir, "no .png/.jpg/.jpeg images in the folder"));
        }
        files.sort();
        Ok(ImageFolder { files })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Image `index` (modulo the number of files), as RGB.
    pub fn image(&self, index: usize) -> Result<RgbImage> {
        let path = &self.files[index % self.files.len()];
        let image =
            image::open(path).map_err(|e| Error::file(path, format!("cannot decode: {e}")))?;
        Ok(image.to_rgb8())
    }

    /// Puzzle `index` of `split`: image `index` modulo the folder size, shuffled by the rng of
    /// (task seed, split, index), so sample i is always the same and later epochs over the
    /// folder get new shuffles.
    pub fn sample(&self, task: &JigsawTask, split: Split, index: u64) -> Result<JigsawSample> {
        let image = self.image(index as usize)?;
        task.sample_from_image(&image, split, index).map_err(|e| {
            Error::file(
                &self.files[index as usize % self.files.len()],
                e.to_string(),
            )
        })
    }
}

/// Every prompt and answer word the jigsaw can produce (for the tiny vocabulary); numbers are
/// covered by single-digit tokens.
pub fn vocabulary_texts() -> Vec<String> {
    let mut texts = Vec::new();
    for format in Format::ALL {
        for question in [
            Question::Full,
            Question::Pair {
                first: 1,
                second: 2,
            },
        ] {
            texts.push(question.prompt(2, 2, format));
        }
    }
    texts.extend(Direction::ALL.iter().map(|d| d.name().to_string()));
    // The reasoning traces' words ("part 1 was at row 1 column 2, so 2.").
    let img = RgbImage::new(2, 2);
    if let Ok(puzzle) = Puzzle::with_answer(&img, 2, 2, &[2, 1, 4, 3]) {
        for question in [
            Question::Full,
            Question::Pair {
                first: 1,
                second: 2,
            },
        ] {
            texts.extend(question.reasoning(&puzzle));
        }
    }
    texts
}
