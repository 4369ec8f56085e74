//! The request headers courier sets itself, which an account's `headers` may not set and
//! its `signature_header` may not name (docs/configuration.md, "`[[account]]`").

use std::collections::HashMap;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::error::ConfigError;
use super::validate::Validator;

/// The headers courier sets on webhook requests, lower case: src/http/mod.rs sets
/// `content-type`, `user-agent`, the `x-courier-*` ones and the Standard Webhooks ones
/// (reserved for every account, signing or not), the HTTP client
/// `content-length`, `host` and `transfer-encoding`. A header src/http/mod.rs starts to set
/// belongs in this list, so that no account can set it too.
pub const COURIER_REQUEST_HEADERS: &[&str] = &[
    "content-type",
    "user-agent",
    "content-length",
    "host",
    "transfer-encoding",
    crate::http::DELIVERY_ID_HEADER,
    crate::http::ATTEMPT_HEADER,
    crate::http::EVENT_COUNT_HEADER,
    crate::http::WEBHOOK_ID_HEADER,
    crate::http::WEBHOOK_TIMESTAMP_HEADER,
    crate::http::WEBHOOK_SIGNATURE_HEADER,
];

/// Every header whose name starts with this is courier's, also those a later release
/// adds.
pub const COURIER_HEADER_PREFIX: &str = "x-courier-";

/// Whether courier sets `name` itself: one of [`COURIER_REQUEST_HEADERS`] or a name
/// starting with [`COURIER_HEADER_PREFIX`].
pub fn is_courier_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    COURIER_REQUEST_HEADERS.contains(&name) || name.starts_with(COURIER_HEADER_PREFIX)
}

/// `account.signature_header`: a valid name that is not one of courier's.
pub(super) fn signature_header(
    v: &Validator,
    account: &str,
    raw: &str,
) -> Result<HeaderName, ConfigError> {
    let key = "account.signature_header";
    let header = HeaderName::try_from(raw)
        .map_err(|_| v.err(key, Some(account), "is not a valid header name"))?;
    if is_courier_header(&header) {
        return Err(v.err(key, Some(account), "may not be a header courier sets"));
    }
    Ok(header)
}

/// `account.headers`: valid names and values, none of courier's nor the signature
/// header; values marked sensitive so they never print.
pub(super) fn account_headers(
    v: &Validator,
    account: &str,
    raw: HashMap<String, String>,
    signature_header: &HeaderName,
) -> Result<HeaderMap, ConfigError> {
    let mut headers = HeaderMap::new();
    for (name, value) in raw {
        let key = format!("account.headers.{name}");
        let err = |message: &str| v.err(&key, Some(account), message);
        let header =
            HeaderName::try_from(name.as_str()).map_err(|_| err("is not a valid header name"))?;
        if is_courier_header(&header) || header == *signature_header {
            return Err(err("may not replace a header courier sets"));
        }
        let mut value = HeaderValue::try_from(value)
            .map_err(|_| err("the value is not a valid header value"))?;
        value.set_sensitive(true);
        headers.append(header, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MINIMAL, error_of};
    use super::*;

    #[test]
    fn courier_headers_are_refused_in_headers_and_as_signature_header() {
        let names = COURIER_REQUEST_HEADERS.iter().copied().chain([
            "x-courier-anything",
            "X-Courier-Attempt",
            DEFAULT_SIGNATURE,
        ]);
        for name in names {
            let err = error_of(&format!("{MINIMAL}\nheaders = {{ {name} = \"x\" }}\n"));
            assert_eq!(err.key, format!("account.headers.{name}"), "{err}");
            assert_eq!(err.message, "may not replace a header courier sets");
            assert_eq!(err.account.as_deref(), Some("acme"));
            if name == DEFAULT_SIGNATURE {
                continue;
            }
            let err = error_of(&format!("{MINIMAL}\nsignature_header = \"{name}\"\n"));
            assert_eq!(err.key, "account.signature_header", "{name}: {err}");
        }
    }

    const DEFAULT_SIGNATURE: &str = super::super::DEFAULT_SIGNATURE_HEADER;

    #[test]
    fn header_values_are_sensitive() {
        let text = format!("{MINIMAL}\nheaders = {{ Authorization = \"Bearer t\" }}\n");
        let s = super::super::testing::parse_with(&text, &[]).unwrap();
        let value = &s.accounts["acme"].headers["authorization"];
        assert!(value.is_sensitive());
    }
}
