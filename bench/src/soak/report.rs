//! The soak report (being built).
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::invariants::Verdict;
use super::timeline::Timeline;
use super::{Options, StoreKind};

pub struct SoakResults {
    pub stores: Vec<(StoreKind, Timeline, Vec<Verdict>)>,
}

impl SoakResults {
    pub fn new(_o: &Options) -> Self {
        SoakResults { stores: vec![] }
    }
    pub fn push(&mut self, store: StoreKind, t: Timeline, v: Vec<Verdict>) {
        self.stores.push((store, t, v));
    }
    pub fn all_held(&self) -> bool {
        self.stores
            .iter()
            .all(|(_, _, v)| v.iter().all(|v| v.violations.is_empty()))
    }
}

pub fn write(_out: &Path, _r: &SoakResults) -> Result<PathBuf> {
    bail!("soak report: not built yet")
}
