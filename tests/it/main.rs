//! Integration tests against a real RabbitMQ and real receivers on loopback.

mod alarm;
mod broker_tls;
mod cli;
mod failures;
mod helpers;
mod hostile;
mod operator;
mod paths;
mod pipeline;
mod receivers;
mod restarts;
mod retries;
mod tls;
mod versions;
