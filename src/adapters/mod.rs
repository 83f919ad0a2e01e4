//! Adapters: the technologies that implement the ports and expose the domain.

pub mod agent;
pub mod approval_broadcast;
pub mod cluster;
pub mod control;
pub mod ed25519;
pub mod http;
pub mod json;
pub mod mcp;
pub mod memory;
pub mod metrics;
pub mod persistence;
pub mod stream;
pub mod ws;
