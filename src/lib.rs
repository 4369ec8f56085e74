//! courier: a durable webhook delivery worker. Upstream systems publish record-change
//! events to RabbitMQ; courier batches them per account and record type, signs each body
//! with HMAC-SHA256, POSTs it, and settles every message only once its effect is durable.
//!
//! A map of the crate, in the order an event travels (docs/design.md draws it):
//!
//! - [`config`]: the settings tree, `${VAR}` expansion, validation.
//! - [`broker`]: connecting, topology, confirmed publishing, acks by watermark, and the
//!   `x-courier-*` headers.
//! - [`pipeline`]: the worker, one module per stage: session, consume, batch, deliver,
//!   decide, settle, reload.
//! - [`event`]: parse and validate an event, borrowing from the message body.
//! - [`sign`]: HMAC signatures and delivery ids; pure functions.
//! - [`http`]: one HTTP attempt and its `Outcome`; the private-network guard.
//! - [`circuit`]: the circuit breaker's state per destination.
//! - [`metrics`]: every metric in one struct; [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`commands`]: `check`, `setup`, `publish`, `receive`, `dlq`; [`cli`]: the command
//!   line.
//! - [`telemetry`]: logging set-up.

pub mod admin;
pub mod broker;
pub mod circuit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod event;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod sign;
pub mod telemetry;
