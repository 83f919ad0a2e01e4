//! The domain: what an agent server is, independent of any transport or
//! storage technology. Depends only on [`crate::ports`].

pub mod agent;
pub mod approvals;
pub mod chat;
pub mod control;
pub mod events;
pub mod message;
pub mod session;
pub mod session_service;
