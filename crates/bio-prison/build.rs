//! Declares the `loom` cfg, under which the crate's mutexes become loom's (see `src/sync.rs`).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
}
