//! Qwen tokenizer and chat template against transformers
//! (tests/fixtures/tokenizer_cases.json, written by tools/parity/make_tokenizer_fixtures.py).
//!
//! Cases that need the real vocabulary read ../shared/tokenizers/qwen/tokenizer.json and skip
//! when it is absent; the template rendering and a tiny byte-level tokenizer built here run
//! everywhere.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tessera::qwen2_5_vl::tokenizer::{
    apply_chat_template, image_token_count, Content, Message, QwenTokenizer, SpecialIds,
};

const REAL_TOKENIZER: &str = "../shared/tokenizers/qwen/tokenizer.json";

fn real_tokenizer() -> Option<QwenTokenizer> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(REAL_TOKENIZER);
    if !path.is_file() {
        println!("skipped: {REAL_TOKENIZER} not found");
        return None;
    }
    Some(QwenTokenizer::from_file(&path).expect("load the Qwen tokenizer"))
}

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).expect("read tokenizer_cases.json");
    serde_json::from_str(&text).expect("parse tokenizer_cases.json")
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids array")
        .iter()
        .map(|id| id.as_u64().expect("id") as u32)
        .collect()
}

/// Fixture messages: `{"role", "content": [{"type": "text", "text"} | {"type": "image", "grid_thw"}]}`.
fn messages_of(value: &Value) -> Vec<Message> {
    let content_of = |item: &Value| match item["type"].as_str() {
        Some("text") => Content::Text(item["text"].as_str().expect("text").to_string()),
        Some("image") => {
            let grid = ids_of(&item["grid_thw"]);
            Content::Image {
                grid_thw: [grid[0] as usize, grid[1] as usize, grid[2] as usize],
            }
        }
        other => panic!("unknown content type {other:?}"),
    };
    value
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().expect("role").to_string(),
            content: m["content"]
                .as_array()
                .expect("content")
                .iter()
                .map(content_of)
                .collect(),
        })
        .collect()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tessera_tokenizer_{}_{name}", std::process::id()))
}

// ---- against transformers (real vocabulary) ----

#[test]
fn encode_matches_transformers() {
    let Some(tokenizer) = real_tokenizer() else {
        return;
    };
    let fixture = fixture();
    let cases = fixture["encode"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let expected = ids_of(&case["ids"]);
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, expected, "case {name}: {text:?}");
        let decoded = tokenizer.decode(&ids, false).unwrap();
        assert_eq!(decoded, case["decode"].as_str().unwrap(), "case {name}");
        let decoded = tokenizer.decode(&ids, true).unwrap();
        assert_eq!(
            decoded,
            case["decode_skip_special"].as_str().unwrap(),
            "case {name}"
        );
    }
}

#[test]
fn decode_round_trips_nfc_text() {
    let Some(tokenizer) = real_tokenizer() else {
        return;
    };
    let fixture = fixture();
    for case in fixture["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let round_trip = tokenizer
            .decode(&tokenizer.encode(text).unwrap(), false)
            .unwrap();
        if case["name"] == "combining_characters_nfc" {
            // The NFC normaliser composes e + U+0301 into é: the round trip gives the NFC form.
            assert_ne!(round_trip, text);
            assert!(
                round_trip.starts_with("Café ñ Ångström Å"),
                "{round_trip:?}"
            );
        } else {
            assert_eq!(round_trip, text, "case {}", case["name"]);
        }
    }
}

#[test]
fn encode_chat_matches_transformers_processor() {
    let Some(tokenizer) = real_tokenizer() else {
        return;
    };
    let fixture = fixture();
    let merge_size = fixture["merge_size"].as_u64().unwrap() as usize;
    for case in fixture["chat"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let messages = messages_of(&case["messages"]);
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let ids = tokenizer
            .encode_chat(&messages, add_generation_prompt, merge_size)
            .unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "case {name}");
    }
}

#[test]
fn real_special_ids_are_qwen2_5_vl_ids() {
    let Some(tokenizer) = real_tokenizer() else {
        return;
    };
    assert_eq!(*tokenizer.special(), SpecialIds::QWEN2_5_VL);
    assert_eq!(tokenizer.token_id("<|vision_pad|>"), Some(151654));
    assert_eq!(tokenizer.special().stop_ids(), [151645, 151643]);
}

#[test]
fn user_prompt_is_one_user_turn_with_generation_prompt() {
    let Some(tokenizer) = real_tokenizer() else {
        return;
    };
    let ids = tokenizer
        .encode_user_prompt(&[[1, 4, 6]], "Describe this image.", 2)
        .unwrap();
    let expected = tokenizer
        .encode_chat(
            &[Message {
                role: "user".into(),
                content: vec![
                    Content::Image {
                        grid_thw: [1, 4, 6],
                    },
                    Content::Text("Describe this image.".into()),
                ],
            }],
            true,
            2,
        )
        .unwrap();
    assert_eq!(ids, expected);
    let pads = ids.iter().filter(|&&id| id == 151655).count();
    assert_eq!(pads, 6);
}

// ---- no tokenizer file needed ----

#[test]
fn chat_template_renders_like_transformers() {
    let fixture = fixture();
    for case in fixture["chat"].as_array().unwrap() {
        let messages = messages_of(&case["messages"]);
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            apply_chat_template(&messages, add_generation_prompt),
            case["rendered"].as_str().unwrap(),
            "case {}",
            case["name"]
        );
    }
}

#[test]
fn chat_template_matches_reference_example() {
    let rendered = apply_chat_template(&[Message::user(&[[1, 4, 4]], "TEXT")], true);
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
         <|vision_start|><|image_pad|><|vision_end|>TEXT<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn missing_tokenizer_file_error_names_it() {
    let path = temp_path("does_not_exist.json");
    let err = QwenTokenizer::from_file(&path).err().expect("missing file");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("not found"), "{msg}");
}

#[test]
fn invalid_tokenizer_file_error_names_it() {
    let path = temp_path("invalid.json");
    std::fs::write(&path, "{\"not\": \"a tokenizer\"}").unwrap();
    let err = QwenTokenizer::from_file(&path).err().expect("invalid file");
    std::fs::remove_file(&path).ok();
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn image_token_count_is_thw_over_merge_squared() {
    assert_eq!(image_token_count([1, 4, 6], 2).unwrap(), 6);
    assert_eq!(image_token_count([1, 34, 46], 2).unwrap(), 391);
    assert_eq!(image_token_count([2, 4, 4], 2).unwrap(), 8);
    assert!(image_token_count([1, 5, 4], 2).is_err());
    assert!(image_token_count([1, 4, 4], 0).is_err());
}

// ---- tiny byte-level tokenizer: ids are the UTF-8 bytes, specials follow at 256.. ----

const TINY_SPECIALS: [&str; 7] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// GPT-2's byte → printable character map used by byte-level BPE.
fn byte_to_char() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// A tokenizer.json with Qwen's normaliser, split regex and byte-level coding, no merges.
fn tiny_tokenizer_json(specials: &[&str]) -> String {
    let vocab: serde_json::Map<String, Value> = byte_to_char()
        .into_iter()
        .enumerate()
        .map(|(byte, c)| (c.to_string(), json!(byte)))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, token)| {
            json!({"id": 256 + i, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let split = json!({"type": "Split", "pattern": {"Regex":
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
        "behavior": "Isolated", "invert": false});
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

fn tiny_tokenizer() -> QwenTokenizer {
    QwenTokenizer::from_bytes(tiny_tokenizer_json(&TINY_SPECIALS).as_bytes()).unwrap()
}

fn bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

#[test]
fn tiny_special_ids_are_resolved_by_string() {
    let path = temp_path("tiny_tokenizer.json");
    std::fs::write(&path, tiny_tokenizer_json(&TINY_SPECIALS)).unwrap();
    let tokenizer = QwenTokenizer::from_file(&path);
    std::fs::remove_file(&path).ok();
    let tokenizer = tokenizer.unwrap();
    let special = *tokenizer.special();
    assert_eq!(
        special,
        SpecialIds {
            endoftext: 256,
            im_start: 257,
            im_end: 258,
            vision_start: 259,
            vision_end: 260,
            image_pad: 261,
            video_pad: 262,
        }
    );
    assert_eq!(tokenizer.token_id("<|image_pad|>"), Some(261));
    assert_eq!(tokenizer.vocab_size(), 263);
}

#[test]
fn tiny_tokenizer_without_image_pad_is_rejected() {
    let json = tiny_tokenizer_json(&TINY_SPECIALS[..5]);
    let err = QwenTokenizer::from_bytes(json.as_bytes()).err().unwrap();
    assert!(err.to_string().contains("<|image_pad|>"), "{err}");
}

#[test]
fn tiny_encode_decode_round_trip() {
    let tokenizer = tiny_tokenizer();
    let text = "héllo  wörld\n\t你好 🦀 <|im_end|>";
    let ids = tokenizer.encode(text).unwrap();
    let mut expected = bytes("héllo  wörld\n\t你好 🦀 ");
    expected.push(258);
    assert_eq!(ids, expected);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    assert_eq!(
        tokenizer.decode(&ids, true).unwrap(),
        "héllo  wörld\n\t你好 🦀 "
    );
}

#[test]
fn tiny_chat_expands_each_image_pad_to_its_grid() {
    let tokenizer = tiny_tokenizer();
    let special = *tokenizer.special();
    let messages = [
        Message::text("system", "Be brief."),
        Message {
            role: "user".into(),
            content: vec![
                Content::Image {
                    grid_thw: [1, 4, 6],
                },
                Content::Text("Compare\n".into()),
                Content::Image {
                    grid_thw: [1, 2, 2],
                },
            ],
        },
        Message::text("assistant", "Same."),
    ];
    let rendered = apply_chat_template(&messages, false);
    assert_eq!(
        rendered,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n\
         <|vision_start|><|image_pad|><|vision_end|>Compare\n\
         <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n\
         <|im_start|>assistant\nSame.<|im_end|>\n"
    );
    let ids = tokenizer.encode_chat(&messages, false, 2).unwrap();
    let mut expected = vec![special.im_start];
    expected.extend(bytes("system\nBe brief."));
    expected.push(special.im_end);
    expected.extend(bytes("\n"));
    expected.push(special.im_start);
    expected.extend(bytes("user\n"));
    expected.push(special.vision_start);
    expected.extend([special.image_pad; 6]); // 1*4*6 / 2²
    expected.push(special.vision_end);
    expected.extend(bytes("Compare\n"));
    expected.push(special.vision_start);
    expected.push(special.image_pad); // 1*2*2 / 2²
    expected.push(special.vision_end);
    expected.push(special.im_end);
    expected.extend(bytes("\n"));
    expected.push(special.im_start);
    expected.extend(bytes("assistant\nSame."));
    expected.push(special.im_end);
    expected.extend(bytes("\n"));
    assert_eq!(ids, expected);
}

#[test]
fn tiny_user_prompt_has_default_system_and_generation_prompt() {
    let tokenizer = tiny_tokenizer();
    let special = *tokenizer.special();
    let ids = tokenizer.encode_user_prompt(&[[1, 4, 4]], "Hi", 2).unwrap();
    let mut expected = vec![special.im_start];
    expected.extend(bytes("system\nYou are a helpful assistant."));
    expected.push(special.im_end);
    expected.extend(bytes("\n"));
    expected.push(special.im_start);
    expected.extend(bytes("user\n"));
    expected.push(special.vision_start);
    expected.extend([special.image_pad; 4]);
    expected.push(special.vision_end);
    expected.extend(bytes("Hi"));
    expected.push(special.im_end);
    expected.extend(bytes("\n"));
    expected.push(special.im_start);
    expected.extend(bytes("assistant\n"));
    assert_eq!(ids, expected);
}

#[test]
fn typed_image_pad_without_its_image_is_an_error() {
    let tokenizer = tiny_tokenizer();
    let messages = [Message::user(&[[1, 2, 2]], "what is <|image_pad|>?")];
    let err = tokenizer.encode_chat(&messages, true, 2).err().unwrap();
    assert!(
        err.to_string()
            .contains("2 <|image_pad|> tokens for 1 images"),
        "{err}"
    );
    let err = tokenizer.encode_chat(&[], true, 2).err().unwrap();
    assert!(err.to_string().contains("no messages"), "{err}");
    let err = tokenizer
        .encode_user_prompt(&[[1, 3, 4]], "odd grid", 2)
        .err()
        .unwrap();
    assert!(err.to_string().contains("merge_size"), "{err}");
}
