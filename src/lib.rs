//! autopoiesis: an AI agent on the network.
//!
//! The crate is a hexagon: [`domain`] holds the rules (sessions, the chat turn
//! and its deferred-approval policy, approvals, the control plane), [`ports`]
//! the traits the domain needs from the outside world, and [`adapters`] the
//! technologies that implement them or expose the domain (poem HTTP and
//! WebSocket, the session stream, MCP, the sea-orm approval store, the
//! in-memory session store, the echo and OpenAI-compatible runtimes).
//! [`app`] composes them, for the binary and the tests alike; the map is
//! `docs/architecture.md`.

pub mod adapters;
pub mod app;
pub mod domain;
pub mod ports;
