//! latentcache: the pure-Rust core (`core`) and, with the `python` feature, its PyO3 binding (`py`).
// Without the binding nothing calls the core's API; the default build reports what is really dead.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) mod core;
#[cfg(feature = "python")]
mod py;
