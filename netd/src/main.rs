//! netd, the per-host weft daemon. Arrives with the single-host issue.

fn main() {
    eprintln!("netd: not implemented yet (see DESIGN.md)");
    std::process::exit(1);
}
