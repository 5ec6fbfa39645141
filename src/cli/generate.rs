//! `tessera generate` (being built).

use crate::{Error, Result};

#[derive(clap::Args)]
pub struct GenerateArgs {}

pub fn run(_args: GenerateArgs) -> Result<()> {
    Err(Error::msg("tessera generate: not built yet"))
}
