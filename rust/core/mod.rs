//! The pure-Rust core: no pyo3 here, so `cargo test --no-default-features` runs without libpython.
pub mod cache_path;
pub mod error;
pub mod file;
pub mod load;
pub mod npy;
mod pool;
mod quick;
pub mod scan;
pub mod schema;
pub mod validate;
pub mod write;
pub mod zip;
