//! # portcullis
//!
//! Resilient LLM API clients as tower middleware. This facade re-exports the workspace's
//! crates.
#![forbid(unsafe_code)]

pub use portcullis_core as core;
pub use portcullis_core::*;
pub use portcullis_layers as layers;
pub use portcullis_providers as providers;
pub use portcullis_sim as sim;
