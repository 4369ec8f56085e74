//! courier: a durable webhook delivery worker. Upstream systems publish record-change
//! events to RabbitMQ; courier batches them per account and record type, signs each body
//! with HMAC-SHA256, POSTs it, and settles every message only once its effect is durable.
//!
//! A map of the crate, in the order an event travels:
//!
//! - [`config`]: the settings tree, `${VAR}` expansion, validation.
//! - [`broker`]: connecting, topology, confirmed publishing.
//! - [`event`]: parse and validate an event, borrowing from the message body.
//! - [`batch`]: the accumulator, one open batch per destination.
//! - [`sign`]: HMAC signatures and delivery ids; pure functions.
//! - [`deliver`]: one HTTP attempt and its `Outcome`.
//! - [`retry`]: immediate backoff and the next scheduled tier; [`circuit`]: the breaker.
//! - [`guard`]: the private-network guard on destination addresses.
//! - [`pipeline`]: the worker itself; owns the acknowledgements.
//! - [`metrics`]: every metric in one struct; [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`commands`]: `check`, `setup`, `publish`, `receive`; [`cli`]: the command line.
//! - [`telemetry`]: logging set-up.

pub mod admin;
pub mod batch;
pub mod broker;
pub mod circuit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod deliver;
pub mod event;
pub mod guard;
pub mod metrics;
pub mod pipeline;
pub mod retry;
pub mod sign;
pub mod telemetry;
