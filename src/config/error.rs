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
