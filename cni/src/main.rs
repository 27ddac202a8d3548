//! The weft CNI plugin. Arrives with the single-host issue.

fn main() {
    eprintln!("weft CNI plugin: not implemented yet (see DESIGN.md)");
    std::process::exit(1);
}
