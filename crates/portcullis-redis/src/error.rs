use std::fmt;
use std::time::Duration;

use portcullis_core::ConfigError;

/// What can go wrong building a [`RedisStore`](crate::RedisStore), talking to Redis outside
/// admissions, or starting a [`LocalRedis`](crate::LocalRedis).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid: the token bucket's limits, or the store's own (a duration out of
    /// range, `fail_open_share` outside (0, 1]).
    Config(ConfigError),
    /// The Redis URL does not parse.
    InvalidUrl(String),
    /// The store must be built inside a Tokio runtime (it spawns its background task there).
    NoRuntime,
    /// Redis answered with an error, or the connection failed.
    Redis(redis::RedisError),
    /// Redis did not answer within the timeout.
    Timeout(Duration),
    /// `redis-server` is not on the `PATH`.
    ServerNotFound,
    /// `redis-server` could not be started, or did not answer in time.
    ServerStart(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::InvalidUrl(e) => write!(f, "invalid Redis URL: {e}"),
            Error::NoRuntime => f.write_str("a RedisStore must be built inside a Tokio runtime"),
            Error::Redis(e) => write!(f, "redis: {e}"),
            Error::Timeout(d) => write!(f, "redis did not answer within {d:?}"),
            Error::ServerNotFound => f.write_str(
                "`redis-server` is not on the PATH: install it (Debian/Ubuntu: \
                 `apt-get install redis-server`, macOS: `brew install redis`) or point to a \
                 running Redis with a URL",
            ),
            Error::ServerStart(e) => write!(f, "could not start redis-server: {e}"),
        }
    }
}

impl Error {
    /// Whether the error is about one key's data (a script error such as `WRONGTYPE`, a reply
    /// that does not parse) rather than about Redis itself (no connection, a timeout, a server
    /// that is loading, read-only or refusing).
    pub fn is_about_one_key(&self) -> bool {
        use redis::{ErrorKind, ServerErrorKind};
        match self {
            Error::Redis(e) if e.is_io_error() || e.is_timeout() => false,
            Error::Redis(e) if e.is_connection_dropped() || e.is_connection_refusal() => false,
            Error::Redis(e) => matches!(
                e.kind(),
                ErrorKind::Parse
                    | ErrorKind::UnexpectedReturnType
                    | ErrorKind::Extension
                    | ErrorKind::Server(
                        ServerErrorKind::ResponseError | ServerErrorKind::ExecAbort
                    )
            ),
            _ => false,
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(e) => Some(e),
            Error::Redis(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(e)
    }
}
