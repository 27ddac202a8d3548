//! The weft CNI plugin binary (`type: "weft"`). Everything happens in the
//! `weft_cni` library; this reads the environment and stdin, prints the
//! answer on stdout and exits 0 on success, 1 on error.

use std::io::{Read, Write};

use weft_cni::{code, CniError, CniVersion, Env};

fn main() {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    // VERSION may come without any stdin at all; other commands fail on the
    // empty configuration.
    let out = match std::io::stdin().lock().read_to_end(&mut stdin) {
        Ok(_) => weft_cni::run(&env, &stdin),
        Err(e) => weft_cni::Output {
            stdout: CniError::new(code::IO_FAILURE, format!("reading stdin: {e}"))
                .to_json(CniVersion::LATEST.as_str()),
            success: false,
        },
    };
    let mut stdout = std::io::stdout().lock();
    if !out.stdout.is_empty() {
        let _ = writeln!(stdout, "{}", out.stdout);
    }
    let _ = stdout.flush();
    std::process::exit(if out.success { 0 } else { 1 });
}
