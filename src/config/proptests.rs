//! Generated input for the configuration loader: arbitrary text, and the full example
//! file (deploy/courier.toml.example) with lines dropped, repeated or given other values,
//! and odd environment variables. Whatever comes in, `parse` returns: never a panic, and
//! every refusal is a [`ConfigError`] that names the file and a key.

use std::collections::HashMap;
use std::path::Path;

use proptest::prelude::*;

use super::{ConfigError, parse};

/// Every key is refused or accepted from this file, all at their defaults.
const EXAMPLE: &str = include_str!("../../deploy/courier.toml.example");

/// The variables `EXAMPLE` expands.
const VARS: [&str; 3] = ["RABBITMQ_PASSWORD", "ACME_WEBHOOK_SECRET", "ACME_TOKEN"];

/// The keys an error may name first: the sections and top-level keys, or the file's
/// syntax as a whole.
const FIRST_SEGMENTS: [&str; 10] = [
    "(syntax)",
    "(top level)",
    "shutdown_timeout",
    "broker",
    "delivery",
    "retry",
    "circuit",
    "admin",
    "log",
    "account",
];

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    }
}

/// Parses `text` as `test.toml` with the variables `vars` (`None`: not set).
fn parse_checked(text: &str, vars: &HashMap<String, String>) -> Result<(), ConfigError> {
    let result = parse(Path::new("test.toml"), text, &|name| {
        vars.get(name).cloned()
    });
    if let Err(e) = &result {
        assert_names_a_key(e, text);
    }
    result.map(|_| ())
}

/// The error names the file and a key: one of the file's sections or top-level keys, or
/// a key as the text wrote it (an unknown one is named so that it can be found).
fn assert_names_a_key(e: &ConfigError, source: &str) {
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("test.toml: {}", e.key)),
        "{text:?} does not start with the file and key"
    );
    let first = e.key.split('.').next().unwrap_or_default();
    assert!(
        FIRST_SEGMENTS.contains(&first) || (!first.is_empty() && source.contains(first)),
        "{text:?}: {:?} is not a key of the file",
        e.key
    );
    assert!(!e.message.trim().is_empty(), "{text:?} says nothing");
}

/// A TOML value as written: each type, edge values, strings that look like the values
/// keys expect, and `${VAR}` references.
fn value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "0",
            "-1",
            "1",
            "65535",
            "65536",
            "4294967296",
            "nan",
            "inf",
            "-inf",
            "1.5",
            "true",
            "false",
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "{}",
            "[]",
        ])
        .prop_map(str::to_owned),
        prop::sample::select(vec![
            "",
            "0s",
            "-1s",
            "1ms",
            "5m",
            "1h 30m",
            "99999999999999h",
            "none",
            "per_record",
            "json",
            "text",
            "trace",
            "amqp://",
            "amqp://h:0/",
            "amqp://[::1]/",
            "amqps://u:p@h/%2f",
            "http://127.0.0.1:1/",
            "https://a",
            "ftp://a/",
            "[::1]:0",
            "127.0.0.1:99999",
            "x-goodfit-hmac-sha256",
            "content-type",
            "${}",
            "${1X}",
            "${UNSET}",
            "${ACME_TOKEN}",
            "$${ACME_TOKEN}",
            "${ACME_TOKEN",
        ])
        .prop_map(toml_string),
        any::<String>().prop_map(|s| toml_string(&s)),
    ];
    scalar.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[A-Za-z-]{1,12}", inner), 0..4).prop_map(|v| {
                let pairs: Vec<String> = v.into_iter().map(|(k, x)| format!("{k} = {x}")).collect();
                format!("{{ {} }}", pairs.join(", "))
            }),
        ]
    })
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A key to add: one the file uses (in any section), or another.
fn key() -> impl Strategy<Value = String> {
    let known: Vec<String> = EXAMPLE
        .lines()
        .filter_map(|line| line.trim().trim_start_matches('#').split_once(" = "))
        .map(|(k, _)| k.trim().to_owned())
        .filter(|k| !k.is_empty() && !k.contains(' '))
        .collect();
    prop_oneof![
        3 => prop::sample::select(known),
        1 => "[a-z_]{1,16}",
    ]
}

/// One change to a line of the example file.
#[derive(Debug, Clone)]
enum Edit {
    Drop,
    Repeat,
    /// Its value replaced (or, on a line with no value, a `key = value` line added).
    Value(String, String),
    /// Text typed into it.
    Insert(prop::sample::Index, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        Just(Edit::Drop),
        Just(Edit::Repeat),
        (key(), value()).prop_map(|(k, v)| Edit::Value(k, v)),
        (
            any::<prop::sample::Index>(),
            "[\\[\\]{}=\"'#.,\\n a-z0-9]{1,6}"
        )
            .prop_map(|(at, s)| Edit::Insert(at, s)),
    ]
}

/// The example's lines with `edits` applied, each at its own line.
fn edited(edits: &[(prop::sample::Index, Edit)]) -> String {
    let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
    for (at, edit) in edits {
        let i = at.index(lines.len());
        match edit {
            Edit::Drop => {
                lines.remove(i);
            }
            Edit::Repeat => lines.insert(i, lines[i].clone()),
            Edit::Value(key, value) => match lines[i].split_once(" = ") {
                Some((k, _)) => lines[i] = format!("{k} = {value}"),
                None => lines.insert(i + 1, format!("{key} = {value}")),
            },
            Edit::Insert(at, text) => {
                let line = &mut lines[i];
                let mut at = at.index(line.len() + 1);
                while !line.is_char_boundary(at) {
                    at -= 1;
                }
                line.insert_str(at, text);
            }
        }
        if lines.is_empty() {
            break;
        }
    }
    lines.join("\n")
}

/// The example's variables, each set to a generated value or left unset.
fn vars() -> impl Strategy<Value = HashMap<String, String>> {
    let value = prop_oneof![
        3 => "[A-Za-z0-9]{1,20}",
        1 => any::<String>(),
        1 => Just("${ACME_TOKEN}".to_owned()),
        1 => Just("pa\"ss\nword@h:1/".to_owned()),
    ];
    prop::collection::vec(prop::option::weighted(0.9, value), VARS.len()).prop_map(|values| {
        VARS.iter()
            .zip(values)
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect()
    })
}

fn all_vars() -> HashMap<String, String> {
    VARS.iter()
        .map(|k| (k.to_string(), "value".to_owned()))
        .collect()
}

#[test]
fn the_example_file_is_valid() {
    assert!(parse_checked(EXAMPLE, &all_vars()).is_ok());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_is_refused_naming_a_key(text in any::<String>()) {
        // Any text without an `[[account]]` table lacks the one required account.
        let err = parse_checked(&text, &all_vars());
        prop_assert!(err.is_err());
    }

    #[test]
    fn toml_shaped_text_never_panics(text in "([\\[\\]{}=\"'#.,\\n a-z0-9$]|broker|account|url|id){0,80}") {
        let _ = parse_checked(&text, &all_vars());
    }

    #[test]
    fn an_edited_example_is_loaded_or_refused_naming_a_key(
        edits in prop::collection::vec((any::<prop::sample::Index>(), edit()), 1..4),
        vars in vars(),
    ) {
        let _ = parse_checked(&edited(&edits), &vars);
    }

    #[test]
    fn any_value_for_any_key_is_loaded_or_refused_naming_a_key(
        at in any::<prop::sample::Index>(),
        key in key(),
        value in value(),
    ) {
        let text = edited(&[(at, Edit::Value(key, value))]);
        let _ = parse_checked(&text, &all_vars());
    }
}
