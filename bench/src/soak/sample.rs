//! The sampler (being built).
use anyhow::{bail, Result};

use super::World;

pub fn run(_w: &World) -> Result<()> {
    bail!("soak sampler: not built yet")
}

pub fn final_samples(_w: &World) -> Result<()> {
    bail!("soak sampler: not built yet")
}
