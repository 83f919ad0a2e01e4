//! The one integration-test binary: the real server on 127.0.0.1:0, spoken
//! to over real sockets.

mod cli;
mod helpers;
mod rest;
mod sse;
mod turns;
mod ws;
