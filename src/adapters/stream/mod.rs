//! The session stream, whatever carries it: implements the
//! [`crate::ports::SessionEvents`] port by numbering each session's events
//! (`seq`), keeping a window of recent ones, replaying it (with a `gap`
//! notice for what left it) to clients that resume, and letting each client
//! read the window through its own cursor.
//!
//! Two thin transports sit on top, each importing this module and never the
//! other: WebSocket in `src/adapters/ws/` (the endpoint and the ops clients
//! send) and SSE in `src/adapters/http/sse.rs` (next to the `/api/sessions`
//! routes that serve it: SSE is plain HTTP and its frame is a poem-openapi
//! type). This module knows neither.

pub mod activity;
pub mod frames;
pub mod hub;
pub mod writer;

pub use activity::{Activity, ActivityKind, Ending};
pub use hub::{
    ClientSlot, CloseReason, Frame, SessionHub, Sharing, StreamSettings, SubscribeError,
    Subscription,
};
