//! The session stream's transports: the connection hub every client of a
//! session subscribes to, its wire encoding, and the WebSocket endpoint.

pub mod endpoint;
pub mod hub;
pub mod protocol;

pub use hub::{CloseReason, SessionHub, StreamSettings, SubscribeError, Subscription};
