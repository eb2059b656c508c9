//! The pure-Rust core: no pyo3 here, so `cargo test --no-default-features` runs without libpython.
//!
//! Layers, bottom first (a module uses only layers below it; no cycles): error, file, zip (records)
//! <- npy <- schema (rules) <- cache_path, meta, quick <- validate, load; temp <- lock; pool; write
//! uses zip, npy, file, temp, lock and nothing but the binding's write entry uses `write`; scan uses
//! cache_path and temp. `docs/architecture.md` draws the same picture.
pub mod cache_path;
pub mod error;
pub mod file;
pub mod load;
pub mod lock;
pub mod meta;
pub mod npy;
mod pool;
mod quick;
pub mod scan;
pub mod schema;
pub mod temp;
pub mod validate;
#[cfg(test)]
mod win_paths_tests;
pub mod write;
pub mod zip;
