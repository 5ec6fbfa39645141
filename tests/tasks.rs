//! The jigsaw task (puzzles, prompts, parser, reward), the prior-knowledge suites, the JSONL
//! datasets, and the tiny preset's tokenizer and config.
//!
//! `TESSERA_REGENERATE_TINY=1 cargo test --test tasks` rewrites models/tiny/tokenizer.json from
//! the generator (after changing a prompt or a word list); without it the test fails when the
//! committed file and the generator disagree.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use image::{imageops, Rgb, RgbImage};
use tessera::qwen2_5_vl::config::Config;
use tessera::qwen2_5_vl::tokenizer::{Message, QwenTokenizer};
use tessera::qwen2_5_vl::weights::random_params;
use tessera::tasks::dataset::{export_suite, load_jsonl, write_jsonl, Record};
use tessera::tasks::jigsaw::{
    crop_to_grid, synthetic_image, Direction, Format, ImageFolder, JigsawSample, JigsawTask,
    Puzzle, Question, QuestionType,
};
use tessera::tasks::reward::{parse_answer, parse_pair_answer, reward, Reward, RewardWeights};
use tessera::tasks::suites::{Scorer, Suite};
use tessera::tasks::vocab::{self, padded_vocab_size, UNK};
use tessera::tasks::Split;
use tessera::{DType, Rng};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A fresh, empty temporary folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    // Under target/ (CARGO_TARGET_TMPDIR), not the system temp folder; one folder per test,
    // emptied when the test starts again.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tasks_{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Random pixels: every piece of a puzzle cut from it is different.
fn noise_image(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed);
    RgbImage::from_fn(width, height, |_, _| {
        Rgb([
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
        ])
    })
}

// ---- puzzles ----

#[test]
fn puzzle_unshuffles_to_the_cropped_original_pixel_exact() {
    let cases: [(u32, u32, usize, usize); 4] = [
        (56, 56, 2, 2),
        (57, 61, 3, 3),
        (60, 45, 2, 3),
        (10, 7, 1, 2),
    ];
    for (width, height, rows, cols) in cases {
        for seed in 0..20 {
            let img = noise_image(width, height, seed);
            let mut rng = Rng::new(100 + seed);
            let puzzle = Puzzle::new(&img, rows, cols, &mut rng).expect("puzzle");

            // The centre crop, computed here independently of the library.
            let (crop_w, crop_h) = (width - width % cols as u32, height - height % rows as u32);
            let expected = imageops::crop_imm(
                &img,
                (width - crop_w) / 2,
                (height - crop_h) / 2,
                crop_w,
                crop_h,
            )
            .to_image();
            assert_eq!(puzzle.original, expected);
            assert_eq!(puzzle.shuffled.dimensions(), (crop_w, crop_h));

            // Put the piece at each current position X back at its original position answer[X].
            let (piece_w, piece_h) = (crop_w / cols as u32, crop_h / rows as u32);
            let corner = |cell: usize| {
                (
                    (cell % cols) as u32 * piece_w,
                    (cell / cols) as u32 * piece_h,
                )
            };
            let mut restored = RgbImage::new(crop_w, crop_h);
            for (x, &y) in puzzle.answer.iter().enumerate() {
                let (sx, sy) = corner(x);
                let piece =
                    imageops::crop_imm(&puzzle.shuffled, sx, sy, piece_w, piece_h).to_image();
                let (tx, ty) = corner(y - 1);
                imageops::replace(&mut restored, &piece, tx as i64, ty as i64);
            }
            assert_eq!(
                restored, expected,
                "{width}x{height} {rows}x{cols} seed {seed}"
            );
            assert_eq!(
                puzzle.unshuffle(&puzzle.answer).expect("unshuffle"),
                expected
            );
        }
    }
}

#[test]
fn shuffles_are_uniform_over_permutations_identity_included() {
    let img = noise_image(8, 8, 0);
    let mut rng = Rng::new(1);
    let mut counts: HashMap<Vec<usize>, usize> = HashMap::new();
    for _ in 0..2400 {
        let puzzle = Puzzle::new(&img, 2, 2, &mut rng).expect("puzzle");
        *counts.entry(puzzle.answer).or_default() += 1;
    }
    assert_eq!(counts.len(), 24, "every permutation of 4 pieces appears");
    assert!(
        counts.contains_key(&vec![1, 2, 3, 4]),
        "the identity is allowed"
    );
    // Expected 100 each, standard deviation about 10.
    for (permutation, &count) in &counts {
        assert!(
            (55..=145).contains(&count),
            "{permutation:?} seen {count} times"
        );
    }
}

#[test]
fn bad_grids_and_answers_are_errors() {
    let img = noise_image(3, 3, 0);
    let mut rng = Rng::new(0);
    assert!(Puzzle::new(&img, 4, 4, &mut rng).is_err());
    assert!(Puzzle::new(&img, 1, 1, &mut rng).is_err());
    assert!(Puzzle::new(&img, 0, 2, &mut rng).is_err());
    assert!(crop_to_grid(&img, 3, 1).is_ok());
    let img = noise_image(8, 8, 0);
    assert!(Puzzle::with_answer(&img, 2, 2, &[1, 2, 3]).is_err());
    assert!(Puzzle::with_answer(&img, 2, 2, &[1, 2, 2, 3]).is_err());
    assert!(Puzzle::with_answer(&img, 2, 2, &[0, 1, 2, 3]).is_err());
    let puzzle = Puzzle::with_answer(&img, 2, 2, &[2, 1, 4, 3]).expect("puzzle");
    assert!(puzzle.direction(1, 1).is_err());
    assert!(puzzle.direction(1, 5).is_err());
}

#[test]
fn pair_directions_follow_the_original_layout() {
    let img = noise_image(8, 8, 0);
    let puzzle = Puzzle::with_answer(&img, 2, 2, &[2, 1, 4, 3]).expect("puzzle");
    // Now at 1: original 2 (top right); now at 2: original 1 (top left).
    assert_eq!(puzzle.direction(1, 2).expect("pair"), Direction::Right);
    assert_eq!(puzzle.direction(2, 1).expect("pair"), Direction::Left);
    assert_eq!(puzzle.direction(3, 1).expect("pair"), Direction::Bottom);
    assert_eq!(
        puzzle.direction(3, 2).expect("pair"),
        Direction::BottomRight
    );
    assert_eq!(puzzle.direction(1, 4).expect("pair"), Direction::TopRight);
    assert_eq!(puzzle.direction(1, 3).expect("pair"), Direction::Top);
    let img = noise_image(9, 9, 0);
    let puzzle = Puzzle::with_answer(&img, 3, 3, &[9, 2, 3, 4, 5, 6, 7, 8, 1]).expect("puzzle");
    assert_eq!(puzzle.direction(9, 1).expect("pair"), Direction::TopLeft);
    assert_eq!(puzzle.direction(3, 7).expect("pair"), Direction::TopRight);
    assert_eq!(puzzle.direction(7, 3).expect("pair"), Direction::BottomLeft);
}

// ---- parser ----

#[test]
fn parser_accepts_whitespace_variants() {
    let want = Some(vec![2, 1, 4, 3]);
    let accepted = [
        ("2 1 4 3", Format::Plain),
        ("  2 1\n4 3\n", Format::Plain),
        ("<answer>2 1 4 3</answer>", Format::NoThink),
        (" <answer> 2 1 4 3 </answer> ", Format::NoThink),
        ("<answer>2 1\n4 3</answer>", Format::NoThink),
        (
            "<think>top is bright</think><answer>2 1 4 3</answer>",
            Format::Think,
        ),
        (
            "<think> top is bright </think>\n<answer> 2 1\n4 3 </answer>",
            Format::Think,
        ),
        ("<think></think> <answer>2 1 4 3</answer>", Format::Think),
    ];
    for (text, format) in accepted {
        let parsed = parse_answer(text, format, 2, 2);
        assert_eq!(parsed.value, want, "{text:?}");
        assert!(parsed.format_ok, "{text:?}");
    }
    let parsed = parse_answer("9 8 7 6 5 4 3 2 1", Format::Plain, 3, 3);
    assert_eq!(parsed.value, Some(vec![9, 8, 7, 6, 5, 4, 3, 2, 1]));
}

#[test]
fn parser_rejects_wrong_content() {
    let rejected = [
        "2 1 4",
        "2 1 4 3 1",
        "2 2 4 3",
        "0 1 2 3",
        "2 1 4 5",
        "2 1 4 3 done",
        "the answer is 2 1 4 3",
        "2, 1, 4, 3",
        "+2 1 4 3",
        "-1 2 3 4",
        "2143",
        "",
    ];
    for body in rejected {
        for (text, format) in [
            (body.to_string(), Format::Plain),
            (format!("<answer>{body}</answer>"), Format::NoThink),
            (
                format!("<think>x</think><answer>{body}</answer>"),
                Format::Think,
            ),
        ] {
            let parsed = parse_answer(&text, format, 2, 2);
            assert_eq!(parsed.value, None, "{text:?} should not parse");
        }
        assert!(!parse_answer(body, Format::Plain, 2, 2).format_ok);
    }
    // Tags in a plain answer are extra words.
    assert_eq!(
        parse_answer("<answer>2 1 4 3</answer>", Format::Plain, 2, 2).value,
        None
    );
}

#[test]
fn parser_reports_broken_layouts() {
    let some = Some(vec![2, 1, 4, 3]);
    // (text, format, value, format_ok)
    let cases = [
        (
            "<answer>2 1 4 3</answer>",
            Format::Think,
            some.clone(),
            false,
        ),
        (
            "<think>x<answer>2 1 4 3</answer>",
            Format::Think,
            some.clone(),
            false,
        ),
        (
            "<think>x</think> so <answer>2 1 4 3</answer>",
            Format::Think,
            some.clone(),
            false,
        ),
        (
            "<think>x</think><answer>2 1 4 3</answer> done",
            Format::Think,
            some.clone(),
            false,
        ),
        (
            "x <think>x</think><answer>2 1 4 3</answer>",
            Format::Think,
            some.clone(),
            false,
        ),
        (
            "<think>a</think><think>b</think><answer>2 1 4 3</answer>",
            Format::Think,
            some.clone(),
            false,
        ),
        (
            "<think>x</think><answer>2 1 4 3",
            Format::Think,
            None,
            false,
        ),
        ("<think>x</think>2 1 4 3", Format::Think, None, false),
        ("2 1 4 3", Format::Think, None, false),
        (
            "<think>x</think><answer>2 1 4 3</answer><answer>1 2 3 4</answer>",
            Format::Think,
            None,
            false,
        ),
        (
            "<think>x</think><answer>2 1 4 3</answer>",
            Format::NoThink,
            some.clone(),
            false,
        ),
        (
            "so <answer>2 1 4 3</answer>",
            Format::NoThink,
            some.clone(),
            false,
        ),
        ("2 1 4 3", Format::NoThink, None, false),
        ("</answer>2 1 4 3<answer>", Format::NoThink, None, false),
        // Right layout, wrong content: the format still holds.
        ("<answer>2 1 4</answer>", Format::NoThink, None, true),
        (
            "<think>x</think><answer>hello</answer>",
            Format::Think,
            None,
            true,
        ),
    ];
    for (text, format, value, format_ok) in cases {
        let parsed = parse_answer(text, format, 2, 2);
        assert_eq!(parsed.value, value, "{text:?} as {format:?}");
        assert_eq!(parsed.format_ok, format_ok, "{text:?} as {format:?}");
    }
}

#[test]
fn pair_parser_reads_one_direction() {
    let read = |text: &str| parse_pair_answer(text, Format::NoThink).value;
    assert_eq!(read("<answer>top-left</answer>"), Some(Direction::TopLeft));
    assert_eq!(
        read("<answer> top - left </answer>"),
        Some(Direction::TopLeft)
    );
    assert_eq!(
        read("<answer>Bottom-Right</answer>"),
        Some(Direction::BottomRight)
    );
    assert_eq!(read("<answer> right </answer>"), Some(Direction::Right));
    for wrong in [
        "top left",
        "left top",
        "top-left right",
        "topleft",
        "up",
        "",
    ] {
        assert_eq!(
            read(&format!("<answer>{wrong}</answer>")),
            None,
            "{wrong:?}"
        );
    }
    for direction in Direction::ALL {
        let parsed = parse_pair_answer(direction.name(), Format::Plain);
        assert_eq!(parsed.value, Some(direction));
        assert!(parsed.format_ok);
    }
}

// ---- reward ----

fn hand_made_sample(question: Question, format: Format) -> JigsawSample {
    let puzzle = Puzzle::with_answer(&noise_image(56, 56, 3), 2, 2, &[2, 1, 4, 3]).expect("puzzle");
    let answer = question.answer(&puzzle).expect("answer");
    JigsawSample {
        prompt: question.prompt(2, 2, format),
        puzzle,
        question,
        format,
        answer,
    }
}

fn terms(r: Reward) -> (f64, f64, f64, f64) {
    (r.hit, r.acc, r.fmt, r.total)
}

#[test]
fn reward_values_on_hand_made_completions() {
    let weights = RewardWeights::default();
    let full = hand_made_sample(Question::Full, Format::NoThink);
    let score = |text: &str, sample: &JigsawSample, weights: &RewardWeights| {
        terms(reward(text, sample, weights).expect("reward"))
    };
    assert_eq!(
        score("<answer>2 1 4 3</answer>", &full, &weights),
        (1.0, 1.0, 1.0, 3.0)
    );
    assert_eq!(
        score("<answer>2 1 3 4</answer>", &full, &weights),
        (0.5, 0.0, 1.0, 1.5)
    );
    assert_eq!(
        score("<answer>1 2 3 4</answer>", &full, &weights),
        (0.0, 0.0, 1.0, 1.0)
    );
    assert_eq!(
        score("<answer>2 1 4</answer>", &full, &weights),
        (0.0, 0.0, 1.0, 1.0)
    );
    assert_eq!(score("2 1 4 3", &full, &weights), (0.0, 0.0, 0.0, 0.0));
    assert_eq!(
        score("so <answer>2 1 4 3</answer>", &full, &weights),
        (1.0, 1.0, 0.0, 2.0)
    );

    let think = hand_made_sample(Question::Full, Format::Think);
    let custom = RewardWeights {
        hit: 0.5,
        acc: 2.0,
        fmt: 0.25,
    };
    assert_eq!(
        score(
            "<think>bright on top</think><answer>2 1 4 3</answer>",
            &think,
            &custom
        ),
        (1.0, 1.0, 1.0, 2.75)
    );
    assert_eq!(
        score("<answer>2 4 3 1</answer>", &think, &custom),
        (0.25, 0.0, 0.0, 0.125)
    );

    let plain = hand_made_sample(Question::Full, Format::Plain);
    assert_eq!(score(" 2 1\n4 3 ", &plain, &weights), (1.0, 1.0, 1.0, 3.0));
    assert_eq!(score("2 1 4 3 .", &plain, &weights), (0.0, 0.0, 0.0, 0.0));

    let pair = hand_made_sample(
        Question::Pair {
            first: 1,
            second: 2,
        },
        Format::NoThink,
    );
    assert_eq!(pair.answer, "right");
    assert_eq!(
        score("<answer>right</answer>", &pair, &weights),
        (1.0, 1.0, 1.0, 3.0)
    );
    assert_eq!(
        score("<answer>left</answer>", &pair, &weights),
        (0.0, 0.0, 1.0, 1.0)
    );
    assert_eq!(score("right", &pair, &weights), (0.0, 0.0, 0.0, 0.0));
}

#[test]
fn every_task_target_earns_the_full_reward() {
    let weights = RewardWeights::default();
    for format in Format::ALL {
        for question in [QuestionType::Full, QuestionType::Pair] {
            for (rows, cols) in [(2, 2), (3, 3), (2, 3)] {
                let task = JigsawTask {
                    rows,
                    cols,
                    question,
                    format,
                    image_size: 60,
                    seed: 7,
                };
                for index in 0..20 {
                    let sample = task.synthetic_sample(Split::Train, index).expect("sample");
                    let r = reward(&sample.target(), &sample, &weights).expect("reward");
                    assert_eq!(terms(r), (1.0, 1.0, 1.0, 3.0), "{task:?} {index}");
                }
            }
        }
    }
}

#[test]
fn reasoning_traces_state_each_piece_origin() {
    let sample = hand_made_sample(Question::Full, Format::Think);
    assert_eq!(
        sample
            .question
            .reasoning(&sample.puzzle)
            .expect("reasoning"),
        "part 1 was at row 1 column 2, so 2. part 2 was at row 1 column 1, so 1. \
         part 3 was at row 2 column 2, so 4. part 4 was at row 2 column 1, so 3."
    );
    let pair = hand_made_sample(
        Question::Pair {
            first: 1,
            second: 2,
        },
        Format::Think,
    );
    assert_eq!(
        pair.question.reasoning(&pair.puzzle).expect("reasoning"),
        "part 1 was at row 1 column 2 and part 2 at row 1 column 1."
    );
}

#[test]
fn jigsaw_samples_are_deterministic_per_split_and_index() {
    let task = JigsawTask::tiny();
    let a = task.synthetic_sample(Split::Train, 5).expect("sample");
    assert_eq!(a, task.synthetic_sample(Split::Train, 5).expect("sample"));
    assert_ne!(a, task.synthetic_sample(Split::Train, 6).expect("sample"));
    assert_ne!(a, task.synthetic_sample(Split::Eval, 5).expect("sample"));
    assert_eq!(a.puzzle.shuffled.dimensions(), (56, 56));
    assert!(a.prompt.contains("order the parts"));
    let other_seed = JigsawTask { seed: 1, ..task };
    assert_ne!(
        a,
        other_seed
            .synthetic_sample(Split::Train, 5)
            .expect("sample")
    );
}

#[test]
fn jigsaw_prompt_shares_the_word_order_with_the_rank_suite() {
    let rank = Suite::Rank.sample(Split::Train, 0);
    let jigsaw = JigsawTask::tiny()
        .synthetic_sample(Split::Train, 0)
        .expect("sample");
    let words = |s: &str| -> HashSet<String> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .map(str::to_string)
            .collect()
    };
    assert!(words(&rank.question).contains("order"));
    assert!(words(&jigsaw.prompt).contains("order"));
    assert!(words(&jigsaw.prompt).contains("parts"));
    assert!(words(&rank.question).contains("parts"));
}

#[test]
fn synthetic_images_carry_positional_cues() {
    let mut rng = Rng::new(3);
    for _ in 0..10 {
        let img = synthetic_image(&mut rng, 56);
        // Mean over a region of one channel (or of all three for brightness).
        let mean = |x0: u32, y0: u32, w: u32, h: u32, channel: Option<usize>| {
            let mut sum = 0.0;
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    let p = img.get_pixel(x, y).0;
                    sum += match channel {
                        Some(c) => p[c] as f64,
                        None => p.iter().map(|&v| v as f64).sum::<f64>() / 3.0,
                    };
                }
            }
            sum / (w * h) as f64
        };
        assert!(mean(0, 0, 56, 28, None) > mean(0, 28, 56, 28, None) + 20.0);
        assert!(mean(0, 0, 28, 56, Some(0)) > mean(28, 0, 28, 56, Some(0)) + 20.0);
        assert!(mean(28, 0, 28, 56, Some(2)) > mean(0, 0, 28, 56, Some(2)) + 20.0);
    }
}

#[test]
fn image_folder_lists_sorted_images_and_samples_deterministically() {
    let dir = temp_dir("folder");
    for (name, seed) in [("b.png", 1), ("a.png", 0), ("c.jpg", 2)] {
        noise_image(30, 20, seed)
            .save(dir.join(name))
            .expect("save");
    }
    std::fs::write(dir.join("notes.txt"), "not an image").expect("write");
    let folder = ImageFolder::open(&dir).expect("open");
    let names: Vec<String> = folder
        .files()
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["a.png", "b.png", "c.jpg"]);
    let task = JigsawTask::tiny();
    let sample = folder.sample(&task, Split::Train, 4).expect("sample");
    assert_eq!(
        sample,
        folder.sample(&task, Split::Train, 4).expect("sample")
    );
    // Index 4 of 3 files is b.png again, with its own shuffle.
    let b = noise_image(30, 20, 1);
    assert_eq!(
        sample.puzzle.original,
        crop_to_grid(&b, 2, 2).expect("crop")
    );
    assert_eq!(
        sample,
        task.sample_from_image(&b, Split::Train, 4).expect("sample")
    );

    let empty = temp_dir("folder_empty");
    let err = ImageFolder::open(&empty)
        .expect_err("no images")
        .to_string();
    assert!(err.contains("folder_empty"), "{err}");
}

// ---- suites ----

#[test]
fn suites_are_deterministic_per_split_and_index() {
    for suite in Suite::ALL {
        for split in [Split::Train, Split::Eval] {
            for index in [0, 1, 17, 1000] {
                let a = suite.sample(split, index);
                assert_eq!(a, suite.sample(split, index), "{} {index}", suite.name());
                assert_eq!(a.image.is_some(), suite.has_image());
                if let Some(image) = &a.image {
                    assert_eq!(image.dimensions(), (56, 56));
                }
                assert!(!a.answer.trim().is_empty());
                assert_eq!(a.scorer.score(&a.answer, &a.answer), 1.0);
            }
        }
        assert_eq!(Suite::from_name(suite.name()), Some(suite));
    }
}

#[test]
fn suite_train_and_eval_are_disjoint() {
    for suite in Suite::ALL.into_iter().filter(|s| s.has_image()) {
        let key = |split: Split, index: u64| {
            let sample = suite.sample(split, index);
            let image = sample.image.expect("image suite");
            (image.into_raw(), sample.question)
        };
        let train: HashSet<_> = (0..200).map(|i| key(Split::Train, i)).collect();
        let eval: HashSet<_> = (0..200).map(|i| key(Split::Eval, i)).collect();
        assert!(
            train.is_disjoint(&eval),
            "{}: train and eval share a sample",
            suite.name()
        );
        assert!(
            train.len() > 150 && eval.len() > 150,
            "{}: too few distinct samples",
            suite.name()
        );
    }
}

#[test]
fn suite_answers_cover_their_label_sets() {
    let expected: [(Suite, &[&str]); 4] = [
        (
            Suite::Colour,
            &["red", "green", "blue", "yellow", "purple", "orange"],
        ),
        (Suite::Shape, &["circle", "square", "triangle"]),
        (Suite::Count, &["1", "2", "3", "4"]),
        (
            Suite::Position,
            &["top-left", "top-right", "bottom-left", "bottom-right"],
        ),
    ];
    for (suite, labels) in expected {
        let seen: HashSet<String> = (0..300)
            .map(|i| suite.sample(Split::Train, i).answer)
            .collect();
        let labels: HashSet<String> = labels.iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, labels, "{}", suite.name());
    }
}

#[test]
fn rank_and_position_labels_match_their_images() {
    for index in 0..100 {
        let sample = Suite::Rank.sample(Split::Eval, index);
        let image = sample.image.expect("image");
        let level = |quadrant: usize| {
            image
                .get_pixel(
                    (quadrant as u32 % 2) * 28 + 5,
                    (quadrant as u32 / 2) * 28 + 5,
                )
                .0[0]
        };
        let order: Vec<usize> = sample
            .answer
            .split(' ')
            .map(|w| w.parse::<usize>().expect("digit") - 1)
            .collect();
        for pair in order.windows(2) {
            assert!(level(pair[0]) >= level(pair[1]) + 30, "{}", sample.answer);
        }

        let sample = Suite::Position.sample(Split::Train, index);
        let image = sample.image.expect("image");
        let background = *image.get_pixel(0, 0);
        let (mut sx, mut sy, mut n) = (0u64, 0u64, 0u64);
        for (x, y, p) in image.enumerate_pixels() {
            if *p != background {
                sx += x as u64;
                sy += y as u64;
                n += 1;
            }
        }
        assert!(n > 20, "the shape is big enough to see");
        let quadrant = match (sy / n >= 28, sx / n >= 28) {
            (false, false) => "top-left",
            (false, true) => "top-right",
            (true, false) => "bottom-left",
            (true, true) => "bottom-right",
        };
        assert_eq!(sample.answer, quadrant);
    }
}

#[test]
fn suites_draw_at_other_sizes() {
    for suite in Suite::ALL {
        let sample = suite.sample_sized(Split::Train, 3, 112).expect("sample");
        if let Some(image) = sample.image {
            assert_eq!(image.dimensions(), (112, 112));
        }
        assert!(suite.sample_sized(Split::Train, 3, 31).is_err());
        assert!(suite.sample_sized(Split::Train, 3, 32).is_ok());
    }
}

#[test]
fn scorers() {
    assert_eq!(Scorer::Exact.score("  Red \n", "red"), 1.0);
    assert_eq!(Scorer::Exact.score("3  1 4\n2", "3 1 4 2"), 1.0);
    assert_eq!(Scorer::Exact.score("red dog", "red"), 0.0);
    assert_eq!(Scorer::Exact.score("", "red"), 0.0);
    assert_eq!(Scorer::Hit.score("3 1 4 2", "3 1 2 4"), 0.5);
    assert_eq!(Scorer::Hit.score("3 1", "3 1 4 2"), 0.5);
    assert_eq!(Scorer::Hit.score("3 1 4 2 1 1 1 1", "3 1 4 2"), 0.5);
    assert_eq!(Scorer::from_name("hit"), Some(Scorer::Hit));
    assert_eq!(Scorer::from_name("fuzzy"), None);
}

// ---- JSONL ----

#[test]
fn jsonl_round_trip_through_export() {
    let dir = temp_dir("jsonl");
    let path = export_suite(Suite::Colour, Split::Eval, 5, &dir).expect("export");
    let records = load_jsonl(&path).expect("load");
    assert_eq!(records.len(), 5);
    for (index, record) in records.iter().enumerate() {
        let sample = Suite::Colour.sample(Split::Eval, index as u64);
        assert_eq!(record.question, sample.question);
        assert_eq!(record.answer, sample.answer);
        assert_eq!(record.scorer, Scorer::Exact);
        assert_eq!(record.load_image().expect("image"), sample.image);
    }
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(
        text.contains("\"image\":\"images/colour_eval_00000.png\""),
        "{text}"
    );

    // Written again next to the first file: the same records come back.
    let copy = dir.join("copy.jsonl");
    write_jsonl(&copy, &records).expect("write");
    assert_eq!(load_jsonl(&copy).expect("load"), records);

    let facts = load_jsonl(export_suite(Suite::Facts, Split::Train, 3, &dir).expect("export"))
        .expect("load");
    assert!(facts.iter().all(|r| r.image.is_none()));
    assert_eq!(facts[0].load_image().expect("none"), None);
}

#[test]
fn jsonl_accepts_defaults_and_names_file_and_line_on_errors() {
    let dir = temp_dir("jsonl_errors");
    let path = dir.join("data.jsonl");
    std::fs::write(
        &path,
        "{\"image\": null, \"question\": \"q\", \"answer\": \"a\"}\n\n\
         {\"image\": \"x.png\", \"question\": \"q\", \"answer\": \"a\", \"scorer\": \"hit\", \"extra\": 1}\n",
    )
    .expect("write");
    let records = load_jsonl(&path).expect("load");
    assert_eq!(
        records,
        [
            Record {
                image: None,
                question: "q".into(),
                answer: "a".into(),
                scorer: Scorer::Exact,
            },
            Record {
                image: Some(dir.join("x.png")),
                question: "q".into(),
                answer: "a".into(),
                scorer: Scorer::Hit,
            },
        ]
    );
    assert!(records[1].load_image().is_err(), "x.png does not exist");

    let bad_lines = [
        "{\"image\": null, \"question\": \"q\", \"answer\": \"a\"}\n{not json\n",
        "{\"image\": null, \"question\": \"q\", \"answer\": \"a\"}\n{\"image\": null, \"question\": \"q\"}\n",
        "{\"image\": null, \"question\": \"q\", \"answer\": \"a\"}\n{\"image\": null, \"question\": \"q\", \"answer\": \"a\", \"scorer\": \"fuzzy\"}\n",
    ];
    for text in bad_lines {
        std::fs::write(&path, text).expect("write");
        let err = load_jsonl(&path).expect_err("malformed").to_string();
        assert!(
            err.contains("data.jsonl") && err.contains("line 2"),
            "{err}"
        );
    }
    let missing = load_jsonl(dir.join("missing.jsonl"))
        .expect_err("missing")
        .to_string();
    assert!(missing.contains("missing.jsonl"), "{missing}");
}

// ---- tiny preset: tokenizer and config ----

fn tiny_tokenizer() -> QwenTokenizer {
    QwenTokenizer::from_file(&repo_path("models/tiny/tokenizer.json")).expect("load tiny tokenizer")
}

#[test]
fn committed_tokenizer_is_what_the_generator_writes() {
    let generated = vocab::tokenizer_json().expect("generate");
    let path = repo_path("models/tiny/tokenizer.json");
    if std::env::var_os("TESSERA_REGENERATE_TINY").is_some() {
        std::fs::write(&path, &generated).expect("write tokenizer.json");
    }
    let committed = std::fs::read_to_string(&path).expect("read tokenizer.json");
    assert!(
        committed == generated,
        "models/tiny/tokenizer.json is stale: run TESSERA_REGENERATE_TINY=1 cargo test --test tasks"
    );
    assert_eq!(
        vocab::TINY_TOKENIZER_JSON,
        generated,
        "embedded copy is stale: rebuild"
    );
}

#[test]
fn tiny_tokenizer_loads_and_encodes_chats() {
    let tokenizer = tiny_tokenizer();
    let special = tokenizer.special();
    assert_eq!(
        [
            special.endoftext,
            special.im_start,
            special.im_end,
            special.vision_start,
            special.vision_end,
            special.image_pad,
            special.video_pad,
        ],
        [0, 1, 2, 3, 4, 5, 6]
    );
    let sample = JigsawTask::tiny()
        .synthetic_sample(Split::Train, 0)
        .expect("sample");
    // A 56x56 image is a [1, 4, 4] patch grid: 4 merged image tokens.
    let prompt = tokenizer
        .encode_user_prompt(&[[1, 4, 4]], &sample.prompt, 2)
        .expect("prompt");
    assert_eq!(
        prompt.iter().filter(|&&id| id == special.image_pad).count(),
        4
    );
    assert_eq!(
        prompt[..2],
        [
            special.im_start,
            tokenizer.token_id("system").expect("system")
        ]
    );
    let chat = tokenizer
        .encode_chat(
            &[
                Message::user(&[[1, 4, 4]], &sample.prompt),
                Message::text("assistant", &sample.target()),
            ],
            false,
            2,
        )
        .expect("chat");
    assert_eq!(chat[..prompt.len()], prompt[..]);
    assert_eq!(chat.last(), Some(&special.im_end));
    assert_eq!(tokenizer.encode("12 plus.").expect("encode").len(), 4);
    assert_eq!(
        tokenizer
            .decode(&tokenizer.encode("top-left").expect("encode"), false)
            .expect("decode"),
        "top-left"
    );
    // The embedded copy is the same tokenizer.
    let embedded = vocab::tiny_tokenizer().expect("embedded");
    assert_eq!(embedded.vocab_size(), tokenizer.vocab_size());
}

/// Ids of `text` in the tiny tokenizer, checked free of [UNK].
fn encode_known(tokenizer: &QwenTokenizer, text: &str) -> Vec<u32> {
    let unk = tokenizer.token_id(UNK).expect("[UNK] id");
    let ids = tokenizer.encode(text).expect("encode");
    assert!(!ids.contains(&unk), "[UNK] in {text:?}");
    assert_eq!(
        ids,
        tokenizer.encode(text).expect("encode"),
        "deterministic"
    );
    ids
}

#[test]
fn tiny_tokenizer_covers_every_suite_without_unknowns() {
    let tokenizer = tiny_tokenizer();
    for suite in Suite::ALL {
        for split in [Split::Train, Split::Eval] {
            for index in 0..300 {
                let sample = suite.sample(split, index);
                let grids: &[[usize; 3]] = if sample.image.is_some() {
                    &[[1, 4, 4]]
                } else {
                    &[]
                };
                let chat = [
                    Message::user(grids, &sample.question),
                    Message::text("assistant", &sample.answer),
                ];
                let ids = tokenizer.encode_chat(&chat, false, 2).expect("chat");
                let unk = tokenizer.token_id(UNK).expect("[UNK] id");
                assert!(
                    !ids.contains(&unk),
                    "[UNK] in {} {:?}",
                    suite.name(),
                    sample.question
                );
                // The model's decoded answer must score as right.
                let answer_ids = encode_known(&tokenizer, &sample.answer);
                let decoded = tokenizer.decode(&answer_ids, true).expect("decode");
                assert_eq!(
                    sample.scorer.score(&decoded, &sample.answer),
                    1.0,
                    "{decoded:?}"
                );
            }
        }
    }
}

#[test]
fn tiny_tokenizer_covers_every_jigsaw_prompt_and_answer() {
    let tokenizer = tiny_tokenizer();
    let weights = RewardWeights::default();
    for format in Format::ALL {
        for question in [QuestionType::Full, QuestionType::Pair] {
            for (rows, cols) in [(2, 2), (3, 3), (2, 3), (3, 2)] {
                let task = JigsawTask {
                    rows,
                    cols,
                    question,
                    format,
                    image_size: 56,
                    seed: 0,
                };
                for index in 0..25 {
                    let sample = task.synthetic_sample(Split::Eval, index).expect("sample");
                    encode_known(&tokenizer, &sample.prompt);
                    let ids = encode_known(&tokenizer, &sample.target());
                    // Decoded completions (special tokens kept or skipped) still parse.
                    for skip_special in [false, true] {
                        let decoded = tokenizer.decode(&ids, skip_special).expect("decode");
                        let r = reward(&decoded, &sample, &weights).expect("reward");
                        assert_eq!(terms(r), (1.0, 1.0, 1.0, 3.0), "{decoded:?}");
                    }
                    // A think completion with the rule-generated reasoning.
                    let reasoning = sample
                        .question
                        .reasoning(&sample.puzzle)
                        .expect("reasoning");
                    let with_reasoning = format.completion(&reasoning, &sample.answer);
                    let ids = encode_known(&tokenizer, &with_reasoning);
                    let decoded = tokenizer.decode(&ids, true).expect("decode");
                    let r = reward(&decoded, &sample, &weights).expect("reward");
                    assert_eq!(terms(r), (1.0, 1.0, 1.0, 3.0), "{decoded:?}");
                }
            }
        }
    }
}

#[test]
fn tiny_config_matches_the_tokenizer() {
    let path = repo_path("models/tiny/config.json");
    let config = Config::from_file(&path).expect("load tiny config");
    assert_eq!(config, vocab::tiny_config().expect("embedded config"));
    let tokenizer = tiny_tokenizer();
    let special = tokenizer.special();
    assert_eq!(
        config.text.vocab_size,
        padded_vocab_size(tokenizer.vocab_size())
    );
    assert_eq!(config.image_token_id, special.image_pad as i64);
    assert_eq!(config.video_token_id, special.video_pad as i64);
    assert_eq!(config.vision_start_token_id, special.vision_start as i64);
    assert_eq!(config.vision_end_token_id, special.vision_end as i64);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_eq!(raw["eos_token_id"], special.im_end);
    assert_eq!(raw["pad_token_id"], special.endoftext);
    assert_eq!(raw["bos_token_id"], special.endoftext);

    let text = &config.text;
    assert_eq!(
        (
            text.hidden_size,
            text.intermediate_size,
            text.num_hidden_layers
        ),
        (128, 352, 4)
    );
    assert_eq!((text.num_attention_heads, text.num_key_value_heads), (4, 2));
    assert_eq!(
        text.mrope_section.iter().sum::<usize>() * 2,
        text.head_dim()
    );
    let vision = &config.vision;
    assert_eq!(
        (
            vision.hidden_size,
            vision.depth,
            vision.num_heads,
            vision.intermediate_size
        ),
        (64, 2, 2, 128)
    );
    assert_eq!(vision.out_hidden_size, text.hidden_size);
    let params = random_params(&config, DType::F32, &mut Rng::new(0)).expect("params");
    println!(
        "tiny preset: vocab {} (tokenizer {}), {} parameters",
        text.vocab_size,
        tokenizer.vocab_size(),
        params.numel()
    );
}

#[test]
fn suite_labels_are_balanced_in_both_splits() {
    // The split is a hash of the drawn image: it must not correlate with the label (an old hash
    // put no triangle in the shape suite's eval split). Every label of the closed-set suites
    // appears in each split at 0.5x..2x its uniform share.
    let suites: [(Suite, usize); 4] = [
        (Suite::Colour, 6),
        (Suite::Shape, 3),
        (Suite::Count, 4),
        (Suite::Position, 4),
    ];
    for (suite, labels) in suites {
        for split in [Split::Train, Split::Eval] {
            for size in [56, 84] {
                let n = 600;
                let mut counts: HashMap<String, usize> = HashMap::new();
                for i in 0..n {
                    let s = suite.sample_sized(split, i, size).expect("sample");
                    *counts.entry(s.answer).or_default() += 1;
                }
                let uniform = n as f64 / labels as f64;
                assert_eq!(
                    counts.len(),
                    labels,
                    "{} {split:?} {size}: {counts:?}",
                    suite.name()
                );
                for (label, &c) in &counts {
                    let r = c as f64 / uniform;
                    assert!(
                        (0.5..=2.0).contains(&r),
                        "{} {split:?} {size}px: label {label} has {c} of {n} ({counts:?})",
                        suite.name()
                    );
                }
            }
        }
    }
}

#[test]
fn a_rank_question_shares_the_jigsaw_prompts_layout() {
    // The base's format prior for the jigsaw: some rank questions are worded like the plain 2x2
    // jigsaw prompt, differing only in what to order by.
    let jigsaw = Question::Full.prompt(2, 2, Format::Plain);
    let rank: HashSet<String> = (0..40)
        .map(|i| Suite::Rank.sample(Split::Train, i).question)
        .collect();
    assert_eq!(rank.len(), 2, "{rank:?}");
    let long = rank
        .iter()
        .find(|q| q.starts_with("the 2 by 2"))
        .expect("jigsaw wording");
    let setup = jigsaw.split(" order the parts").next().unwrap();
    assert!(long.starts_with(setup), "{long:?} vs {jigsaw:?}");
    assert!(long.ends_with("give only the answer.") && jigsaw.ends_with("give only the answer."));
    assert_ne!(long, &jigsaw);
}
