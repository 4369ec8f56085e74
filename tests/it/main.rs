//! Integration tests against a real RabbitMQ and real receivers on loopback.

mod alarm;
mod cli;
mod deploy;
mod examples;
mod failures;
mod helpers;
mod hostile;
mod observe;
mod operator;
mod paths;
mod pipeline;
mod retries;
mod standard_webhooks;
