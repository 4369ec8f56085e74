//! One `[[account]]` → [`Account`]: its id, URLs, batching, signing and headers
//! (docs/configuration.md, "`[[account]]`"). Every error names the account.

use std::collections::HashMap;
use std::sync::Arc;

use secrecy::SecretString;

use super::raw::{self, RawAccount};
use super::validate::Validator;
use super::{Account, ConfigError, HOLD_CAP, MAX_BATCH_SIZE, headers, tls};

/// An account's id for error messages, or its position (`#2`) when the id is missing or
/// not a valid id: an error never shows what was written instead of an id.
pub(super) fn label(raw: &toml::Value, index: usize) -> String {
    raw.get("id")
        .and_then(toml::Value::as_str)
        .filter(|id| crate::event::valid_account(id))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("#{}", index + 1))
}

/// Every `[[account]]`, by id: at least one, no id twice, none with a batch larger than
/// `prefetch`.
pub(super) fn accounts(
    v: &Validator,
    raw: Vec<toml::Value>,
    prefetch: Option<u16>,
) -> Result<HashMap<String, Arc<Account>>, ConfigError> {
    if raw.is_empty() {
        return Err(v.err("account", None, "at least one [[account]] is required"));
    }
    let mut accounts = HashMap::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        // The id first, so every later error can name the account.
        let label = label(&raw, index);
        let raw: RawAccount = raw::shape(v, "account", Some(&label), raw)?;
        let account = account(v, raw, &label)?;
        if let Some(prefetch) = prefetch
            && account.batch_size > usize::from(prefetch)
        {
            return Err(v.err(
                "broker.prefetch",
                None,
                format!(
                    "must be at least the largest batch_size (that of account \"{}\")",
                    account.id
                ),
            ));
        }
        if accounts.contains_key(&*account.id) {
            return Err(v.err("account.id", Some(&label), "duplicate account id"));
        }
        accounts.insert(account.id.to_string(), Arc::new(account));
    }
    Ok(accounts)
}

/// One account, named `label` in errors.
fn account(v: &Validator, raw: RawAccount, label: &str) -> Result<Account, ConfigError> {
    let account = Some(label);
    refuse_unsupported(v, &raw, label)?;
    let id = raw
        .id
        .ok_or_else(|| v.err("account.id", account, "is required"))?;
    if !crate::event::valid_account(&id) {
        return Err(v.err("account.id", account, "must match [A-Za-z0-9_.-]{1,64}"));
    }
    let companies_url = raw
        .companies_url
        .ok_or_else(|| v.err("account.companies_url", account, "is required"))?;
    let companies_url = v.url("account.companies_url", label, &companies_url)?;
    let contacts_url = match raw.contacts_url.as_deref() {
        None | Some("") => None,
        Some(url) => Some(v.url("account.contacts_url", label, url)?),
    };
    let batch_size = v.int(
        "account.batch_size",
        account,
        raw.batch_size,
        1..=MAX_BATCH_SIZE as i64,
    )?;
    let flush_interval = v.duration("account.flush_interval", account, &raw.flush_interval)?;
    v.at_most("account.flush_interval", account, flush_interval, HOLD_CAP)?;
    let hmac_secret = match raw.hmac_secret {
        Some(s) if s.is_empty() => {
            return Err(v.err(
                "account.hmac_secret",
                account,
                "is empty (omit it to send unsigned requests)",
            ));
        }
        other => other.map(SecretString::from),
    };
    let signature_header = headers::signature_header(v, label, &raw.signature_header)?;
    let headers = headers::account_headers(v, label, raw.headers, &signature_header)?;
    let client_identity = tls::client_identity(
        v,
        "account",
        account,
        raw.client_cert.as_deref(),
        raw.client_key.as_deref(),
    )?;
    Ok(Account {
        id: id.into(),
        companies_url,
        contacts_url,
        batch_size,
        flush_interval,
        hmac_secret,
        signature_header,
        headers,
        client_identity,
    })
}

/// Keys of later releases, refused rather than ignored (docs/configuration.md, "Not
/// supported in this release").
fn refuse_unsupported(v: &Validator, raw: &RawAccount, label: &str) -> Result<(), ConfigError> {
    let unsupported = [(
        "account.standard_webhooks_secret",
        raw.standard_webhooks_secret.is_some(),
    )];
    match unsupported.into_iter().find(|(_, set)| *set) {
        Some((key, _)) => Err(v.err(key, Some(label), "is not supported yet")),
        None => Ok(()),
    }
}
