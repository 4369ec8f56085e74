//! `${VAR}` expansion in the string values of the parsed TOML tree.
//!
//! Hand-written on purpose: only the braced form is expanded, so a secret with a bare
//! `$` survives as written (docs/design.md, "`${VAR}` expansion is hand-written";
//! docs/configuration.md, "`${VAR}` expansion").

use super::account;
use super::error::ConfigError;
use super::validate::Validator;

/// A `${VAR}` whose variable is not set: the variable and the key it is in.
struct Missing {
    name: String,
    key: String,
    account: Option<String>,
}

/// Expands every string of the parsed file. An error names the key and, inside
/// `[[account]]`, the account; every variable that is not set is reported at once.
pub(super) fn expand(
    v: &Validator,
    root: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let mut missing = Vec::new();
    for (key, value) in root.iter_mut() {
        match value {
            // Expanded one by one, so an error can name the account.
            toml::Value::Array(accounts) if key == "account" => {
                for (index, account) in accounts.iter_mut().enumerate() {
                    let label = account::label(account, index);
                    let mut names = Vec::new();
                    expand_value(account, key, env, &mut names)
                        .map_err(|(key, message)| v.err(&key, Some(&label), message))?;
                    missing.extend(names.into_iter().map(|(key, name)| Missing {
                        name,
                        key,
                        account: Some(label.clone()),
                    }));
                }
            }
            value => {
                let mut names = Vec::new();
                expand_value(value, key, env, &mut names)
                    .map_err(|(key, message)| v.err(&key, None, message))?;
                missing.extend(names.into_iter().map(|(key, name)| Missing {
                    name,
                    key,
                    account: None,
                }));
            }
        }
    }
    let Some(first) = missing.first() else {
        return Ok(());
    };
    if missing.len() == 1 {
        let message = format!("environment variable {} is not set", first.name);
        return Err(v.err(&first.key, first.account.as_deref(), message));
    }
    let each: Vec<String> = missing
        .iter()
        .map(|m| match &m.account {
            Some(account) => format!("{} ({}, account \"{account}\")", m.name, m.key),
            None => format!("{} ({})", m.name, m.key),
        })
        .collect();
    let message = format!(
        "{} environment variables are not set: {}",
        missing.len(),
        each.join(", ")
    );
    Err(v.err(&first.key, first.account.as_deref(), message))
}

/// Replaces `${NAME}` in every string of the tree below `key`; a variable that is not
/// set is noted in `missing` (key, name) and expansion goes on. An error is the dotted
/// key where it happened and what is wrong.
fn expand_value(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<(String, String)>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            let mut names = Vec::new();
            *s = expand_str(s, env, &mut names).map_err(|m| (key.to_owned(), m))?;
            missing.extend(names.into_iter().map(|name| (key.to_owned(), name)));
        }
        toml::Value::Array(items) => {
            for item in items {
                expand_value(item, key, env, missing)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                expand_value(item, &format!("{key}.{k}"), env, missing)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// One string with every `${NAME}` replaced; a bare `$` is kept. The name of a variable
/// that is not set goes to `missing` (and expands to nothing).
fn expand_str(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) -> Result<String, String> {
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
        match env(name) {
            Some(value) => out.push_str(&value),
            None => missing.push(name.to_owned()),
        }
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
            expand_str("a${X}b$Y${X}", &|_| Some("1".into()), &mut Vec::new()).unwrap(),
            "a1b$Y1"
        );
        let err = error_of(&format!("{MINIMAL}\nhmac_secret = \"${{NOPE}}\"\n"));
        assert_eq!(err.key, "account.hmac_secret");
        assert_eq!(err.account.as_deref(), Some("acme"));
        assert!(err.to_string().contains("NOPE"), "{err}");
    }

    #[test]
    fn every_missing_variable_is_reported_at_once() {
        let text = MINIMAL.replace(
            "[[account]]",
            "[admin]\nlisten = \"${NOPE_A}\"\n[[account]]",
        );
        let err = error_of(&format!(
            "{text}\nhmac_secret = \"${{NOPE_B}}\"\nheaders = {{ X = \"${{NOPE_C}}${{NOPE_D}}\" }}\n"
        ));
        let text = err.to_string();
        assert!(
            text.contains("4 environment variables are not set"),
            "{text}"
        );
        for named in [
            "NOPE_A (admin.listen)",
            "NOPE_B (account.hmac_secret, account \"acme\")",
            "NOPE_C (account.headers.X",
            "NOPE_D (account.headers.X",
        ] {
            assert!(text.contains(named), "{named} not in {text}");
        }
    }
}
