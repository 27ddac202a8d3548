//! Container churn through the real CNI plugin (being built).
use anyhow::{bail, Result};

use super::{Probe, World};

pub fn attach_probes(_w: &World) -> Result<Vec<Probe>> {
    bail!("soak churn: not built yet")
}

pub fn run(_w: &World) -> Result<()> {
    bail!("soak churn: not built yet")
}

pub fn delete_all(_w: &World) -> Result<()> {
    bail!("soak churn: not built yet")
}
