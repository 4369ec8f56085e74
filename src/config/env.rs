//! `${VAR}` expansion in the string values of the parsed TOML tree.
//!
//! Hand-written on purpose: only the braced form is expanded, so a secret with a bare
//! `$` survives as written (docs/design.md, "`${VAR}` expansion is hand-written";
//! docs/configuration.md, "`${VAR}` expansion").

use super::account;
use super::error::ConfigError;
use super::validate::Validator;

/// Expands every string of the parsed file. An error names the key and, inside
/// `[[account]]`, the account.
pub(super) fn expand(
    v: &Validator,
    root: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (key, value) in root.iter_mut() {
        match value {
            // Expanded one by one, so an error can name the account.
            toml::Value::Array(accounts) if key == "account" => {
                for (index, account) in accounts.iter_mut().enumerate() {
                    let label = account::label(account, index);
                    expand_value(account, key, env)
                        .map_err(|(key, message)| v.err(&key, Some(&label), message))?;
                }
            }
            value => expand_value(value, key, env)
                .map_err(|(key, message)| v.err(&key, None, message))?,
        }
    }
    Ok(())
}

/// Replaces `${NAME}` in every string of the tree below `key`; an error is the dotted
/// key where it happened and what is wrong.
fn expand_value(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            *s = expand_str(s, env).map_err(|m| (key.to_owned(), m))?;
        }
        toml::Value::Array(items) => {
            for item in items {
                expand_value(item, key, env)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                expand_value(item, &format!("{key}.{k}"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// One string with every `${NAME}` replaced; a bare `$` is kept.
fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or("an unterminated ${ in a string")?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            // What stands between the braces may be part of a value typed in the file.
            return Err("a ${…} that is not a valid variable name".into());
        }
        let value = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MINIMAL, error_of};
    use super::*;

    #[test]
    fn env_expansion_is_braced_only() {
        assert_eq!(
            expand_str("a${X}b$Y${X}", &|_| Some("1".into())).unwrap(),
            "a1b$Y1"
        );
        let err = error_of(&format!("{MINIMAL}\nhmac_secret = \"${{NOPE}}\"\n"));
        assert_eq!(err.key, "account.hmac_secret");
        assert_eq!(err.account.as_deref(), Some("acme"));
        assert!(err.to_string().contains("NOPE"), "{err}");
    }
}
