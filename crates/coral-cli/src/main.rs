//! The `coral` command.
fn main() {
    println!("coral {}", env!("CARGO_PKG_VERSION"));
}
