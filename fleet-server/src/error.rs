//! Errors of the fleet server.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: edgefleet_wire::Error,
    },
    #[error("{0}")]
    Wire(#[from] edgefleet_wire::Error),
    #[error("store: {0}")]
    Store(String),
    /// A write the store's rules refuse (not an I/O failure: retrying it
    /// cannot help).
    #[error("store: {0}")]
    Conflict(String),
    /// This server lost the store's active lease: another server serves
    /// the database now, and this one must stop.
    #[error("store: {0}")]
    Fenced(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
