//! Tokenizer and the Qwen2.5-VL chat template.
//!
//! The byte-level BPE (NFC normaliser, Qwen split regex, byte-level mapping) is the `tokenizers`
//! crate reading a Hugging Face `tokenizer.json`; this file adds what the model needs on top:
//! the special-token ids, the chat template of Qwen2.5-VL's `chat_template.json`, and the
//! processor's expansion of each image's `<|image_pad|>` into one token per merged patch.
//!
//! Special tokens written in the text (a user typing `<|im_start|>`) are matched as special
//! tokens, as transformers does: added tokens are cut out of the text before BPE runs.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::{Error, Result};

pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";
pub const IMAGE_PAD: &str = "<|image_pad|>";
pub const VIDEO_PAD: &str = "<|video_pad|>";

/// System turn the template inserts when the conversation does not start with one.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// Ids of the special tokens the model and the processor use, looked up by their strings in
/// the tokenizer file (so a smaller custom vocabulary works as long as it has the strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `<|endoftext|>`: padding, and a stop token.
    pub endoftext: u32,
    pub im_start: u32,
    /// `<|im_end|>`: end of a turn, the eos token.
    pub im_end: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    /// `<|image_pad|>`: one per merged image patch; the model swaps these rows for vision features.
    pub image_pad: u32,
    pub video_pad: u32,
}

impl SpecialIds {
    /// The ids in the released Qwen2.5-VL tokenizer.
    pub const QWEN2_5_VL: SpecialIds = SpecialIds {
        endoftext: 151643,
        im_start: 151644,
        im_end: 151645,
        vision_start: 151652,
        vision_end: 151653,
        image_pad: 151655,
        video_pad: 151656,
    };

    /// Generation ends on either of these.
    pub fn stop_ids(&self) -> [u32; 2] {
        [self.im_end, self.endoftext]
    }
}

/// One piece of a message: text, or an image given by its patch grid `[t, h, w]`
/// (`image_grid_thw` of the preprocessor, in 14-pixel patches before merging).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Image { grid_thw: [usize; 3] },
}

/// A chat turn: `role` is "system", "user" or "assistant"; pieces render in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: Vec<Content>,
}

impl Message {
    /// A turn holding one text piece.
    pub fn text(role: &str, text: &str) -> Message {
        Message {
            role: role.to_string(),
            content: vec![Content::Text(text.to_string())],
        }
    }

    /// A user turn with the images first, then the text (Qwen's usual order); empty text is
    /// left out.
    pub fn user(image_grids: &[[usize; 3]], text: &str) -> Message {
        let mut content: Vec<Content> = image_grids
            .iter()
            .map(|&grid_thw| Content::Image { grid_thw })
            .collect();
        if !text.is_empty() {
            content.push(Content::Text(text.to_string()));
        }
        Message {
            role: "user".to_string(),
            content,
        }
    }
}

/// Renders `messages` exactly as Qwen2.5-VL's `chat_template.json` does (without
/// `add_vision_id`): a default system turn when the first message is not "system", each turn as
/// `<|im_start|>ROLE\n...<|im_end|>\n`, each image as a single
/// `<|vision_start|><|image_pad|><|vision_end|>`, and `<|im_start|>assistant\n` at the end
/// when `add_generation_prompt`.
pub fn apply_chat_template(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for (i, message) in messages.iter().enumerate() {
        if i == 0 && message.role != "system" {
            out.push_str(&format!(
                "{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"
            ));
        }
        out.push_str(IM_START);
        out.push_str(&message.role);
        out.push('\n');
        for content in &message.content {
            match content {
                Content::Text(text) => out.push_str(text),
                Content::Image { .. } => {
                    out.push_str(VISION_START);
                    out.push_str(IMAGE_PAD);
                    out.push_str(VISION_END);
                }
            }
        }
        out.push_str(IM_END);
        out.push('\n');
    }
    if add_generation_prompt {
        out.push_str(IM_START);
        out.push_str("assistant\n");
    }
    out
}

/// Number of `<|image_pad|>` tokens (merged patches) for an image grid `[t, h, w]`:
/// t*h*w / merge_size².
pub fn image_token_count(grid_thw: [usize; 3], merge_size: usize) -> Result<usize> {
    let [t, h, w] = grid_thw;
    if merge_size == 0 || h % merge_size != 0 || w % merge_size != 0 || t == 0 {
        return Err(Error::msg(format!(
            "image grid {grid_thw:?}: h and w must be positive multiples of merge_size {merge_size}"
        )));
    }
    Ok(t * h * w / (merge_size * merge_size))
}

/// Qwen byte-level BPE tokenizer with its special-token ids.
pub struct QwenTokenizer {
    tokenizer: Tokenizer,
    special: SpecialIds,
}

impl QwenTokenizer {
    /// Loads a Hugging Face `tokenizer.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::file(path, "tokenizer file not found"));
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| Error::file(path, format!("not a valid tokenizer.json: {e}")))?;
        Self::from_tokenizer(tokenizer).map_err(|e| Error::file(path, e.to_string()))
    }

    /// Loads a `tokenizer.json` held in memory (e.g. one embedded with `include_bytes!`).
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(json)
            .map_err(|e| Error::msg(format!("not a valid tokenizer.json: {e}")))?;
        Self::from_tokenizer(tokenizer)
    }

    fn from_tokenizer(mut tokenizer: Tokenizer) -> Result<Self> {
        // Sequences are built here, never cut or padded behind the caller's back.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::msg(format!("special token {token} missing from the tokenizer"))
            })
        };
        let special = SpecialIds {
            endoftext: id(ENDOFTEXT)?,
            im_start: id(IM_START)?,
            im_end: id(IM_END)?,
            vision_start: id(VISION_START)?,
            vision_end: id(VISION_END)?,
            image_pad: id(IMAGE_PAD)?,
            video_pad: id(VIDEO_PAD)?,
        };
        let qwen = QwenTokenizer { tokenizer, special };
        // The chat template writes these as text, so each must come back as its single id.
        for token in [
            ENDOFTEXT,
            IM_START,
            IM_END,
            VISION_START,
            VISION_END,
            IMAGE_PAD,
        ] {
            let ids = qwen.encode(token)?;
            if ids != [qwen.tokenizer.token_to_id(token).unwrap_or(u32::MAX)] {
                return Err(Error::msg(format!(
                    "{token} encodes to {ids:?}, not to its own id: it must be an added token"
                )));
            }
        }
        Ok(qwen)
    }

    pub fn special(&self) -> &SpecialIds {
        &self.special
    }

    /// Vocabulary size including added tokens (the embedding may have more rows).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of `text`. No BOS/EOS is added (Qwen has none); special-token strings in the
    /// text become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::msg(format!("tokenizer encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; with `skip_special` the special tokens (`<|im_end|>`, ...) are dropped.
    /// Ids outside the vocabulary (padding rows of the embedding) are skipped, as in
    /// transformers.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| Error::msg(format!("tokenizer decode: {e}")))
    }

    /// Id of a token string (vocabulary entry or added token).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// String of a token id, in the byte-level alphabet for BPE tokens.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// What Qwen2_5_VLProcessor gives as `input_ids`: the rendered chat template, tokenized,
    /// with each image's `<|image_pad|>` expanded to t*h*w / merge_size² copies (images in
    /// message order). Errors when the number of `<|image_pad|>` tokens in the text differs from
    /// the number of images (e.g. a user typed one), as the processor does.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        merge_size: usize,
    ) -> Result<Vec<u32>> {
        if messages.is_empty() {
            return Err(Error::msg("encode_chat: no messages"));
        }
        let image_grids: Vec<[usize; 3]> = messages
            .iter()
            .flat_map(|m| &m.content)
            .filter_map(|c| match c {
                Content::Image { grid_thw } => Some(*grid_thw),
                Content::Text(_) => None,
            })
            .collect();
        let ids = self.encode(&apply_chat_template(messages, add_generation_prompt))?;
        let image_pad = self.special.image_pad;
        let pad_count = ids.iter().filter(|&&id| id == image_pad).count();
        if pad_count != image_grids.len() {
            return Err(Error::msg(format!(
                "encode_chat: the text holds {pad_count} {IMAGE_PAD} tokens for {} images \
                 ({IMAGE_PAD} typed in the text?)",
                image_grids.len()
            )));
        }
        let pad_runs = image_grids
            .iter()
            .map(|&grid_thw| image_token_count(grid_thw, merge_size))
            .collect::<Result<Vec<usize>>>()?;
        let expanded_len = ids.len() + pad_runs.iter().sum::<usize>() - pad_runs.len();
        let mut expanded = Vec::with_capacity(expanded_len);
        let mut pad_runs = pad_runs.into_iter().peekable();
        for &id in &ids {
            // The counts agree (checked above), so every pad has its run length.
            match pad_runs.next_if(|_| id == image_pad) {
                Some(n) => expanded.extend(std::iter::repeat_n(image_pad, n)),
                None => expanded.push(id),
            }
        }
        Ok(expanded)
    }

    /// One user turn (images first, then `text`) with the generation prompt: the usual
    /// inference prompt.
    pub fn encode_user_prompt(
        &self,
        image_grids: &[[usize; 3]],
        text: &str,
        merge_size: usize,
    ) -> Result<Vec<u32>> {
        self.encode_chat(&[Message::user(image_grids, text)], true, merge_size)
    }
}
