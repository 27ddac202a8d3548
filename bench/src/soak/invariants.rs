//! The invariants, judged over a timeline (being built).
use super::timeline::{DnsSample, Life, Timeline};

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub invariant: String,
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn line(&self) -> String {
        format!("{}: {} violations", self.invariant, self.violations.len())
    }
}

pub fn check(_t: &Timeline, _o: &CheckOptions) -> Vec<Verdict> {
    vec![Verdict {
        invariant: "not built yet".into(),
        violations: vec!["the checkers are not built yet".into()],
    }]
}

pub fn judge_dns(_s: &DnsSample, _lives: &[Life]) -> Option<String> {
    Some("the DNS judge is not built yet".into())
}
