//! `tessera tokenize`: ids of a text, plain or through the Qwen2.5-VL chat template with image
//! placeholders expanded (DESIGN.md, "CLI contracts").

use crate::qwen2_5_vl::tokenizer::QwenTokenizer;
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// A Hugging Face tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    text: String,
    /// Render one user turn with the chat template (system default, images, generation prompt).
    #[arg(long)]
    chat: bool,
    /// One image placeholder per grid T,H,W (in patches), expanded to T·H·W/4 image tokens.
    #[arg(long = "image-grid", value_name = "T,H,W")]
    image_grid: Vec<String>,
}

fn parse_grid(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::msg(format!("--image-grid '{s}': want T,H,W")))?;
    v.try_into()
        .map_err(|_| Error::msg(format!("--image-grid '{s}': want three numbers T,H,W")))
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let tok = QwenTokenizer::from_file(&a.tokenizer)?;
    let grids: Vec<[usize; 3]> = a
        .image_grid
        .iter()
        .map(|g| parse_grid(g))
        .collect::<Result<_>>()?;
    let ids = if a.chat {
        tok.encode_user_prompt(&grids, &a.text, 2)?
    } else if !grids.is_empty() {
        return Err(Error::msg(
            "--image-grid needs --chat (images are placed by the chat template)",
        ));
    } else {
        tok.encode(&a.text)?
    };
    println!("{}", serde_json::json!({ "input_ids": ids }));
    Ok(())
}
