//! Errors of the agent library.

pub use edgefleet_runtime::RuntimeError;

/// Errors of the agent outside the model runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle {path}: {source}")]
    Bundle {
        path: String,
        #[source]
        source: edgefleet_wire::Error,
    },
    #[error("wrong arch: the bundle targets {targets}, this device is {this}")]
    WrongArch { targets: String, this: String },
    #[error("agent too old: the bundle needs agent {required}, this is {ours}")]
    AgentTooOld { required: String, ours: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("local store: {0}")]
    Store(String),
    /// The data directory's filesystem (or quota) is full.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The fleet server answered with an error.
    #[error("{url}: HTTP {status} {code}: {message}")]
    Server {
        url: String,
        status: u16,
        code: String,
        message: String,
    },
    /// The fleet server could not be reached or the transfer broke.
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    /// A bundle this device must not install (anti-rollback, size, digest).
    #[error("{0}")]
    Refused(String),
    #[error("internal error: {0}")]
    Invariant(String),
}

impl AgentError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        AgentError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// Stable code for reports and events.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Io { .. } => "io",
            AgentError::Bundle { source, .. } => source.code(),
            AgentError::WrongArch { .. } => "wrong_arch",
            AgentError::AgentTooOld { .. } => "agent_too_old",
            AgentError::Runtime(e) => e.code(),
            AgentError::Listen { .. } => "listen",
            AgentError::Config(_) => "config",
            AgentError::Store(_) => "store",
            AgentError::NoSpace(_) => "insufficient_space",
            AgentError::Server { .. } => "server_error",
            AgentError::Http { .. } => "unreachable",
            AgentError::Refused(_) => "refused",
            AgentError::Invariant(_) => "internal",
        }
    }
}
