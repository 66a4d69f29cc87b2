//! `cargo xtask`: Coral's developer tasks.
fn main() {}
