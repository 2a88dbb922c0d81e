//! Errors of `fleetctl`: usage, files, packing, and what the server said.

use std::path::PathBuf;

use edgefleet_runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    /// What the command named does not exist (exit 5).
    #[error("not found: {0}")]
    NotFound(String),
    /// The command worked; what it watched ended badly (exit `code`:
    /// 3 paused, 4 aborted).
    #[error("{message}")]
    Outcome { code: i32, message: String },
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
    #[error("golden vectors: {0}")]
    Golden(String),
    #[error("{path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: RuntimeError,
    },
    /// tract's outputs disagree with the independent reference: packing this
    /// would ship a model that computes something else on the device.
    #[error("refusing to pack: tract disagrees with the reference outputs ({form}): {source}")]
    ReferenceMismatch {
        form: &'static str,
        #[source]
        source: RuntimeError,
    },
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    /// The model is slower on this machine than `--max-latency-ms` allows.
    #[error(
        "refusing to pack: median latency {median_ms:.3} ms on this machine ({machine}) is above --max-latency-ms {limit_ms}"
    )]
    TooSlow {
        median_ms: f64,
        limit_ms: f64,
        machine: String,
    },
    /// The server could not be reached or the transfer broke.
    #[error("server: {0}")]
    Remote(String),
    /// The server answered with an error body. `status_line` is the
    /// status with its reason phrase (`409 Conflict`).
    #[error("server: {status_line} {code}: {message}")]
    Api {
        status: u16,
        status_line: String,
        code: String,
        message: String,
    },
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
