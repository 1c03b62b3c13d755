//! outpost: an offline-first sync proxy.
//!
//! The app talks to outpost instead of its API. The data path, top-down:
//!
//! 1. [`server`] accepts HTTP/1.1, h2c and TLS connections within a per-listener budget, and
//!    guards each one (strict HTTP/1 framing, header-read timeout); [`stack`] wraps the handler
//!    in the tower layers (limits, timeouts, access log) in one place.
//! 2. [`proxy`] resolves the request's [`route`] into a [`context::RequestContext`] and sends it
//!    down the read path or the write path.
//! 3. Reads (GET, HEAD) go upstream through [`upstream`] and are stored in [`cache`]; while
//!    [`health`] says the upstream is unreachable they are answered from the cache; on
//!    `overlay` routes [`overlay`] applies the caller's pending writes to JSON answers.
//!    GraphQL queries over POST (`graphql = true` routes) and `QUERY` requests are reads too,
//!    keyed by their body ([`graphql`]).
//! 4. Mutations go upstream while it answers; otherwise [`outbox`] stores them durably in the
//!    [`store`] (embedded redb, or Redis shared by several instances) and answers 202.
//! 5. [`replay`] drains the outbox per partition, in order, with backoff and a rate limit, and
//!    classifies every answer; everything observable is published on [`events`], counted in
//!    [`metrics`] and served by [`admin`] (events, metrics, a status page).
//!
//! [`app`] wires the parts together and runs them until [`shutdown`].

#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod admission;
pub mod app;
pub mod body;
pub mod cache;
pub mod coalesce;
pub mod config;
pub mod context;
pub mod credentials;
pub mod demo;
pub mod error;
pub mod events;
#[cfg(test)]
mod fuzz;
pub mod graphql;
pub mod handoff;
pub mod health;
pub mod loadtest;
pub mod metrics;
pub mod mutations;
pub mod outbox;
pub mod overlay;
pub mod parts;
pub mod proxy;
pub mod record;
pub mod replay;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod stack;
pub mod store;
pub mod upstream;
pub mod warm;
