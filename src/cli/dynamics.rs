//! `tessera dynamics` (being built).

use crate::{Error, Result};

#[derive(clap::Args)]
pub struct DynamicsArgs {}

pub fn run(_args: DynamicsArgs) -> Result<()> {
    Err(Error::msg("tessera dynamics: not built yet"))
}
