//! DNS clients, pings, UDP and TCP flows between the probes (being built).
use anyhow::{bail, Result};

use super::World;

pub fn run(_w: &World) -> Result<()> {
    bail!("soak traffic: not built yet")
}
