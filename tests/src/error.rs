//! The harness's error type.

use std::io;

/// Everything that can go wrong while building, using or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command ran but exited unsuccessfully.
    #[error(
        "`{cmd}` in netns {netns} failed ({status}): {}",
        describe_output(stdout, stderr)
    )]
    Command {
        /// The namespace the command ran in (or targeted, for `ip -n NS ...` and
        /// `ip netns ...`).
        netns: String,
        /// The command line, for humans.
        cmd: String,
        /// How it ended (`exit status: 1`, `signal: 9 (SIGKILL)`, ...).
        status: String,
        /// What it wrote to standard output.
        stdout: String,
        /// What it wrote to standard error.
        stderr: String,
    },
    /// A command could not be started at all (not installed, ...).
    #[error("could not start `{cmd}` in netns {netns}: {source}")]
    Spawn {
        /// The namespace the command was meant to run in.
        netns: String,
        /// The command line, for humans.
        cmd: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// The harness needs root (to create network namespaces) and this process is not.
    #[error("the weft test harness needs root to create network namespaces (run the tests as root: sudo -E cargo test -p weft-tests)")]
    NotRoot,
    /// A name given to the harness, or one it built, is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The lab options make no sense.
    #[error("invalid lab options: {0}")]
    Options(String),
    /// Any other I/O failure (temp files, signals, `/proc`, ...).
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A CNI plugin's result lacks what the caller needed from it.
    #[error("unexpected CNI result: {0}")]
    CniResult(String),
    /// Waiting for something took too long.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The standard error of a failed command, if this is a [`Error::Command`].
    pub fn stderr(&self) -> Option<&str> {
        match self {
            Error::Command { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Shows the tail of what a failed command said, stderr first; long output is cut.
fn describe_output(stdout: &str, stderr: &str) -> String {
    const MAX: usize = 2000;
    let cut = |s: &str| -> String {
        let s = s.trim();
        if s.len() <= MAX {
            s.to_string()
        } else {
            let mut start = s.len() - MAX;
            while !s.is_char_boundary(start) {
                start += 1;
            }
            format!("...{}", &s[start..])
        }
    };
    let (out, err) = (cut(stdout), cut(stderr));
    match (out.is_empty(), err.is_empty()) {
        (true, true) => "no output".to_string(),
        (true, false) => format!("stderr: {err}"),
        (false, true) => format!("stdout: {out}"),
        (false, false) => format!("stderr: {err}; stdout: {out}"),
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
