//! The session stream over WebSocket: the endpoint and the ops clients
//! send on it. The stream itself (numbering, window, replay, delivery) is
//! [`crate::adapters::stream`]; SSE is the other transport over it.

pub mod endpoint;
pub mod protocol;
