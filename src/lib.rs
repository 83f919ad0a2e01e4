//! autopoiesis: an AI agent on the network.
//!
//! The crate is a hexagon: [`domain`] holds the rules (sessions, the chat turn
//! and its deferred-approval policy), [`ports`] the traits the domain needs
//! from the outside world, and [`adapters`] the technologies that implement
//! them (poem HTTP/WebSocket, the echo and OpenAI-compatible runtimes, the
//! in-memory session store). [`app`] composes them, for the binary and the
//! tests alike.

pub mod adapters;
pub mod app;
pub mod domain;
pub mod ports;
