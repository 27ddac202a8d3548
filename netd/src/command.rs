//! The one way netd runs an external program (iptables, nft, conntrack):
//! found in `PATH` or the sbin directories ([`resolve`]), on the host or
//! inside a named network namespace (`ip netns exec <ns> ...`, for tests),
//! with `LC_ALL=C` (the programs' messages are parsed), piped output and
//! optional input. Errors name the command and say what to do: a program
//! that cannot start gets its [`Hint::install`] (or iproute2's when in a
//! network namespace), a failing one its [`Hint::diagnose`] of stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const IPROUTE_HINT: &str = "is iproute2 installed, and does the network namespace exist?";

/// A program could not be started, or failed; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{cmd}`: {source} ({hint})")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("`{cmd}` failed ({status}): {stderr} ({hint})")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
        hint: String,
    },
}

/// What to tell the operator about one program.
#[derive(Debug, Clone, Copy)]
pub struct Hint {
    /// When the program cannot be started: how to install it.
    pub install: &'static str,
    /// When it fails: what to do, from its stderr (`install` is passed
    /// along for the cases nothing else fits).
    pub diagnose: fn(stderr: &str, install: &'static str) -> String,
}

/// Runs programs on the host, or inside a named network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runner {
    /// The network namespace commands run in (`ip netns exec`); `None` is
    /// the host's.
    pub netns: Option<String>,
}

impl Runner {
    /// Runs in network namespace `netns`, or the host's with `None`.
    pub fn new(netns: Option<&str>) -> Runner {
        Runner {
            netns: netns.map(str::to_owned),
        }
    }

    /// Runs `program args...`, feeding `stdin`; the output whatever the exit
    /// status. Fails only when the program cannot be started.
    pub fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        hint: Hint,
    ) -> Result<Output, CommandError> {
        let path = resolve(program);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let spawn_err = |source: std::io::Error| CommandError::Spawn {
            cmd: self.display(program, args),
            hint: match (&self.netns, source.kind()) {
                (Some(_), std::io::ErrorKind::NotFound) => IPROUTE_HINT,
                _ => hint.install,
            },
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A program that dies early closes the pipe; its exit status and
            // stderr tell why, so a write error here is not the story.
            let _ = pipe.write_all(input.as_bytes());
        }
        child.wait_with_output().map_err(spawn_err)
    }

    /// Like [`Runner::run`], but a non-zero exit is a
    /// [`CommandError::Failed`]; the standard output.
    pub fn check(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        hint: Hint,
    ) -> Result<String, CommandError> {
        let out = self.run(program, args, stdin, hint)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(self.failed(program, args, &out, stdin, hint))
    }

    /// The error for `out`, a failed run of `program args...` with input
    /// `stdin`: its stderr (stdout when that is empty), the input line a
    /// `line N` in it refers to (as iptables-restore reports), and the hint.
    pub fn failed(
        &self,
        program: &str,
        args: &[&str],
        out: &Output,
        stdin: Option<&str>,
        hint: Hint,
    ) -> CommandError {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        if let Some(line) = stdin.and_then(|input| failed_line(&stderr, input)) {
            stderr.push_str(&format!(" [that line is: {line}]"));
        }
        CommandError::Failed {
            cmd: self.display(program, args),
            status: out.status.to_string(),
            hint: (hint.diagnose)(&stderr, hint.install),
            stderr,
        }
    }

    /// The command as the operator would type it.
    pub fn display(&self, program: &str, args: &[&str]) -> String {
        let mut s = match &self.netns {
            Some(ns) => format!("ip netns exec {ns} {program}"),
            None => program.to_owned(),
        };
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// The program's full path if it is in `PATH` or one of the sbin
/// directories (which a daemon's or sudo's `PATH` may lack); else the bare name.
pub fn resolve(program: &str) -> PathBuf {
    let from_env = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let fallback = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"];
    from_env
        .into_iter()
        .chain(fallback.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| PathBuf::from(program))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// iptables-restore says `line N failed`; the text of that line of `input`.
fn failed_line(stderr: &str, input: &str) -> Option<String> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    let n = words.windows(2).find_map(|w| {
        (w[0] == "line")
            .then(|| w[1].trim_end_matches(':').parse::<usize>().ok())
            .flatten()
    })?;
    input
        .lines()
        .nth(n.checked_sub(1)?)
        .map(|l| l.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HINT: Hint = Hint {
        install: "is it installed? Debian: apt-get install weft-test",
        diagnose: |stderr, install| format!("{install} / {stderr}"),
    };

    #[test]
    fn failed_line_quotes_the_input() {
        let input = "*nat\n:WEFT-X - [0:0]\n-A WEFT-X -j BOGUS\nCOMMIT\n";
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): line 3 failed", input).as_deref(),
            Some("-A WEFT-X -j BOGUS")
        );
        assert_eq!(
            failed_line(
                "iptables-nft-restore: line 3: RULE_APPEND failed (No such file)",
                input
            )
            .as_deref(),
            Some("-A WEFT-X -j BOGUS")
        );
        assert_eq!(failed_line("line 9 failed", input), None);
        assert_eq!(failed_line("no line number", input), None);
    }

    #[test]
    fn runner_shows_netns() {
        let r = Runner::new(Some("t-h0"));
        assert_eq!(
            r.display("iptables-nft", &["-t", "nat", "-S"]),
            "ip netns exec t-h0 iptables-nft -t nat -S"
        );
        assert_eq!(
            Runner::default().display("conntrack", &["-L"]),
            "conntrack -L"
        );
    }

    #[test]
    fn missing_program_is_a_spawn_error_with_the_install_hint() {
        let e = Runner::default()
            .check("weft-no-such-program", &[], None, HINT)
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CommandError::Spawn { .. }), "{msg}");
        assert!(
            msg.contains("weft-no-such-program") && msg.contains("apt-get install weft-test"),
            "{msg}"
        );
    }

    #[test]
    fn failure_says_stderr_the_input_line_and_the_diagnosis() {
        let r = Runner::default();
        let script = "echo 'oops: line 2 failed' >&2; exit 3";
        let e = r
            .check("sh", &["-c", script], Some("first\nsecond\n"), HINT)
            .unwrap_err();
        let CommandError::Failed {
            cmd,
            status,
            stderr,
            hint,
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!(cmd, &format!("sh -c {script}"));
        assert!(status.contains('3'), "{status}");
        assert_eq!(stderr, "oops: line 2 failed [that line is: second]");
        assert_eq!(hint, &format!("{} / {stderr}", HINT.install));
        // Success: the standard output; stdin reaches the program.
        assert_eq!(r.check("cat", &[], Some("in\n"), HINT).unwrap(), "in\n");
    }
}
