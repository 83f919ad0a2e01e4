//! The integration tests: one binary, one module per area.

mod fake_openai;
mod openai_runtime;
