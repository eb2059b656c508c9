//! The core's one error type: every variant names the file and, where there is one, the npz entry.
use std::path::PathBuf;

/// Errors raised by the core. The binding maps each variant onto a Python exception.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path that is not what the caller said it is (for example not a cache name).
    #[error("{path}: {message}")]
    CachePath { path: String, message: String },

    /// A malformed npz container or npy header.
    #[error("{}: {}{message}", path.display(), entry_prefix(entry))]
    NpzFormat {
        path: PathBuf,
        entry: Option<String>,
        message: String,
    },

    /// An operating-system error on a file, kept with its kind so that Python sees
    /// `FileNotFoundError`, `PermissionError` and friends.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A bad argument from the caller (not a bad file).
    #[error("{0}")]
    Value(String),
}

fn entry_prefix(entry: &Option<String>) -> String {
    match entry {
        Some(e) => format!("entry '{e}': "),
        None => String::new(),
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn npz(path: impl Into<PathBuf>, entry: Option<&str>, message: impl Into<String>) -> Self {
        Error::NpzFormat {
            path: path.into(),
            entry: entry.map(str::to_owned),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
