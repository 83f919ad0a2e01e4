//! The one integration-test binary: each module drives adapters against the
//! real thing (a SQLite file, PostgreSQL when configured, real key files).

mod approval_store;
