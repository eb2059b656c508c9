//! latentcache: the pure-Rust core (`core`) and, with the `python` feature, its PyO3 binding (`py`).
pub mod core;
#[cfg(feature = "python")]
mod py;
