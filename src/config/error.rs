//! The one error of configuration: which file, which key, which account, and what is
//! wrong (docs/configuration.md, "Errors"). Messages never carry a secret value.

use std::fmt;
use std::path::PathBuf;

/// A configuration error: which file, which key, which account, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}{account}: {message}", file = .file.display(), account = AccountLabel(.account))]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// The dotted key path, e.g. `account.batch_size` or `retry.schedule`.
    pub key: String,
    /// The account id (or `#index` when the id itself is missing) for `[[account]]` keys.
    pub account: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

/// ` (account "acme")` after the key, or nothing outside `[[account]]`.
struct AccountLabel<'a>(&'a Option<String>);

impl fmt::Display for AccountLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(account) => write!(f, " (account \"{account}\")"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MINIMAL, parse_with};

    /// The value of `${TOKEN}` in these tests: letters only, so that it also passes for a
    /// URL scheme, a duration unit or a log target.
    const SECRET: &str = "hunterTwoSecret";
    /// A value written into the file where it does not belong.
    const NUMBER: &str = "1234567890";

    /// `MINIMAL` with `line` put where `place` says: `account` (the end of the account),
    /// `broker` (in `[broker]`), `url` (the broker URL replaced), or a section name.
    fn config(place: &str, line: &str) -> String {
        match place {
            "account" => format!("{MINIMAL}\n{line}\n"),
            "top" => format!("{line}\n{MINIMAL}"),
            "broker" => MINIMAL.replace("[broker]", &format!("[broker]\n{line}")),
            "url" => MINIMAL.replace("\"amqp://guest:secretpw@127.0.0.1:5672/%2f\"", line),
            section => format!("[{section}]\n{line}\n{MINIMAL}"),
        }
    }

    #[test]
    fn errors_name_key_account_and_expected_type_but_never_the_value() {
        // (where, line, key, account, what the message must say)
        let cases: &[(&str, &str, &str, Option<&str>, &str)] = &[
            (
                "account",
                "headers = { X-Api-Key = 1234567890 }",
                "account.headers.X-Api-Key",
                Some("acme"),
                "expected a string, found an integer",
            ),
            (
                "account",
                "headers = \"${TOKEN}\"",
                "account.headers",
                Some("acme"),
                "expected a table, found a string",
            ),
            (
                "account",
                "hmac_secret = 1234567890",
                "account.hmac_secret",
                Some("acme"),
                "expected a string",
            ),
            (
                "account",
                "batch_size = \"${TOKEN}\"",
                "account.batch_size",
                Some("acme"),
                "expected an integer, found a string",
            ),
            (
                "account",
                "flush_interval = \"${TOKEN}\"",
                "account.flush_interval",
                Some("acme"),
                "duration",
            ),
            (
                "account",
                "flush_interval = \"5 ${TOKEN}\"",
                "account.flush_interval",
                Some("acme"),
                "unknown unit",
            ),
            (
                "account",
                "contacts_url = \"${TOKEN}:x\"",
                "account.contacts_url",
                Some("acme"),
                "http or https",
            ),
            (
                "account",
                "hmac_secret = \"${hunterTwoSecret!}\"",
                "account.hmac_secret",
                Some("acme"),
                "variable name",
            ),
            (
                "account",
                "colour = \"${TOKEN}\"",
                "account.colour",
                Some("acme"),
                "unknown key",
            ),
            (
                "account",
                "[[account]]\nid = \"${TOKEN} !\"\ncompanies_url = \"http://x/\"",
                "account.id",
                Some("#2"),
                "must match",
            ),
            (
                "account",
                "hmac_secret = 12345678901234567890123",
                "(syntax)",
                None,
                "line ",
            ),
            (
                "top",
                "shutdown_timeout = 1234567890",
                "shutdown_timeout",
                None,
                "expected a string, found an integer",
            ),
            (
                "broker",
                "prefetch = 1234567890",
                "broker.prefetch",
                None,
                "1..=65535",
            ),
            ("url", "\"${TOKEN}:x\"", "broker.url", None, "amqp or amqps"),
            (
                "url",
                "1234567890",
                "broker.url",
                None,
                "expected a string or an array of strings",
            ),
            (
                "log",
                "format = \"${TOKEN}\"",
                "log.format",
                None,
                "\"text\", \"json\"",
            ),
            (
                "log",
                "level = \"${TOKEN}=nonsense\"",
                "log.level",
                None,
                "log level",
            ),
            (
                "delivery",
                "ordering = \"${TOKEN}\"",
                "delivery.ordering",
                None,
                "\"none\"",
            ),
            (
                "delivery",
                "max_body_bytes = 1234567890",
                "delivery.max_body_bytes",
                None,
                "range",
            ),
            (
                "admin",
                "listen = \"${TOKEN}\"",
                "admin.listen",
                None,
                "address:port",
            ),
            (
                "retry",
                "schedule = [\"1s\", \"${TOKEN}\"]",
                "retry.schedule",
                None,
                "duration",
            ),
            (
                "retry",
                "schedule = [\"1234567890ms\", \"1234567890ms\"]",
                "retry.schedule",
                None,
                "repeat",
            ),
            (
                "circuit",
                "cooldown = 1234567890",
                "circuit.cooldown",
                None,
                "expected a string",
            ),
        ];
        for (place, line, key, account, says) in cases {
            let err = parse_with(&config(place, line), &[("TOKEN", SECRET)]).expect_err(line);
            let shown = err.to_string();
            assert_eq!(err.key, *key, "for {line}: {shown}");
            assert_eq!(err.account.as_deref(), *account, "for {line}: {shown}");
            assert!(err.message.contains(says), "for {line}: {shown}");
            assert!(shown.starts_with("test.toml: "), "{shown}");
            let lower = shown.to_lowercase();
            for value in [SECRET, NUMBER] {
                assert!(
                    !lower.contains(&value.to_lowercase()),
                    "for {line}: {shown}"
                );
            }
        }
    }
}
