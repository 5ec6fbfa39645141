//! `tessera train` (being built).

use crate::{Error, Result};

#[derive(clap::Args)]
pub struct TrainArgs {}

pub fn run(_args: TrainArgs) -> Result<()> {
    Err(Error::msg("tessera train: not built yet"))
}
