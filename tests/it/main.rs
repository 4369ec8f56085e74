//! Integration tests against a real RabbitMQ and real receivers on loopback.

mod alarm;
mod broker_tls;
mod cli;
mod cluster;
mod deploy;
mod examples;
mod failures;
mod helpers;
mod hostile;
mod observe;
mod operator;
mod ordering;
mod paths;
mod pipeline;
mod receivers;
mod restarts;
mod retries;
mod standard_webhooks;
mod tls;
mod versions;
