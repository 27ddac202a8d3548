//! The fault scheduler (being built).
use anyhow::{bail, Result};

use super::World;

pub fn run(_w: &World) -> Result<()> {
    bail!("soak faults: not built yet")
}
