//! What the simulator saw.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counts of what the simulator received and how it answered. A snapshot: read it with
/// [`SimHandle::stats`](crate::SimHandle::stats) or `GET /_sim/stats`.
///
/// - endpoints: `chat_completions`, `messages`, `count_tokens`, `models`, `not_found`;
/// - outcomes: `ok`, `rate_limited` (an enforced limit), `unauthorized`, `bad_request`,
///   `too_large`, `not_found`, or the fault that fired (`fault_rate_limit`, `fault_status_503`,
///   `fault_overloaded`, `fault_reset`, `fault_hang`, `fault_truncated`, …).
///   `latency` alone is not an outcome.
/// - statuses: every status sent (a reset or a hang sends none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stats {
    /// Requests received on the API endpoints (control endpoints excluded).
    pub requests: u64,
    /// Requests per endpoint.
    pub by_endpoint: BTreeMap<String, u64>,
    /// Requests per model (those whose body named one).
    pub by_model: BTreeMap<String, u64>,
    /// Requests per outcome.
    pub by_outcome: BTreeMap<String, u64>,
    /// Responses per HTTP status.
    pub by_status: BTreeMap<u16, u64>,
}

impl Stats {
    /// Requests to an endpoint.
    pub fn endpoint(&self, name: &str) -> u64 {
        self.by_endpoint.get(name).copied().unwrap_or(0)
    }
    /// Requests for a model.
    pub fn model(&self, name: &str) -> u64 {
        self.by_model.get(name).copied().unwrap_or(0)
    }
    /// Requests with an outcome.
    pub fn outcome(&self, name: &str) -> u64 {
        self.by_outcome.get(name).copied().unwrap_or(0)
    }
    /// Responses with a status.
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    pub(crate) fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
        *map.entry(key.to_owned()).or_insert(0) += 1;
    }
}
