//! The one integration-test binary: the real server on 127.0.0.1:0 spoken to
//! over real sockets, and adapters driven against the real thing (a SQLite
//! file, PostgreSQL when configured, real key files).

mod approval_store;
mod auth;
mod browser;
mod cli;
mod cluster;
mod connections;
mod console;
mod dashboard;
mod durable;
mod edges;
mod fake_openai;
mod helpers;
mod mcp;
mod openai_chat;
mod openai_facade;
mod openai_runtime;
mod openapi;
mod rest;
mod sse;
mod turns;
mod ws;
