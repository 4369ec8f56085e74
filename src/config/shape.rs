//! The parsed TOML tree → the serde shapes of raw.rs, through a deserializer of our own
//! whose errors name the key and the expected type, never the value
//! (docs/configuration.md, "Errors").
//!
//! serde's own messages quote what they refuse (``invalid type: integer `1234`, expected
//! a string``, an expanded `${VAR}` in ``unknown variant `…` ``), and toml's errors keep no
//! key path. Owning the error type lets [`ShapeError`] drop the value where serde hands
//! it over, and the map access below records the key on the way out.

use std::fmt;

use serde::de::value::StringDeserializer;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};

/// Deserializes `value` as `T`; an error says where below `value` and what was expected.
pub(super) fn from_value<T: DeserializeOwned>(value: toml::Value) -> Result<T, ShapeError> {
    T::deserialize(Node(value))
}

/// A value of the wrong shape: the keys leading to it and what was expected there.
#[derive(Debug)]
pub(super) struct ShapeError {
    /// Keys from the outermost in, below the value given to [`from_value`].
    pub path: Vec<String>,
    /// What is wrong, without the value.
    pub message: String,
}

impl ShapeError {
    fn new(message: String) -> Self {
        Self {
            path: Vec::new(),
            message,
        }
    }

    fn at(field: &str, message: String) -> Self {
        Self {
            path: vec![field.to_owned()],
            message,
        }
    }

    /// The dotted key below `prefix`, e.g. `account.headers.X-Api-Key`.
    pub fn key(&self, prefix: &str) -> String {
        std::iter::once(prefix)
            .chain(self.path.iter().map(String::as_str))
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ShapeError {}

/// Every constructor serde calls with a value keeps only its kind.
impl de::Error for ShapeError {
    /// Reached only by the `Deserialize` impls of raw.rs, whose messages carry no value.
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(msg.to_string())
    }

    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Self::new(format!(
            "expected {}, found {}",
            expected_name(expected),
            kind(&unexpected)
        ))
    }

    fn invalid_value(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Self::new(format!(
            "expected {}, found {} that is not one",
            expected_name(expected),
            kind(&unexpected)
        ))
    }

    fn invalid_length(_len: usize, expected: &dyn Expected) -> Self {
        Self::new(format!("expected {}", expected_name(expected)))
    }

    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Self {
        Self::new(format!("expected one of {}", quoted(expected)))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        if TOP_LEVEL_KEYS.contains(&field) {
            // In TOML a key belongs to the table whose header comes before it.
            return Self::at(
                field,
                format!(
                    "unknown key here: {field} is a top-level key; write it above the first \
                     [section] or [[account]] header, where no table has begun"
                ),
            );
        }
        Self::at(
            field,
            format!("unknown key (the known ones: {})", expected.join(", ")),
        )
    }

    fn missing_field(field: &'static str) -> Self {
        Self::at(field, "is required".into())
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::at(field, "is given twice".into())
    }
}

/// Keys of the top level that are not tables: written after a table header, they land
/// in that table.
const TOP_LEVEL_KEYS: &[&str] = &["shutdown_timeout"];

/// serde's name of an expected type, in the words of docs/configuration.md.
fn expected_name(expected: &dyn Expected) -> String {
    let name = expected.to_string();
    match name.as_str() {
        "i64" | "u64" | "i32" | "u32" | "u16" | "usize" => "an integer".into(),
        "a map" => "a table".into(),
        "a sequence" => "an array".into(),
        _ if name.starts_with("struct ") => "a table".into(),
        _ => name,
    }
}

/// The kind of a refused value, never the value itself.
fn kind(unexpected: &Unexpected<'_>) -> &'static str {
    match unexpected {
        Unexpected::Bool(_) => "a boolean",
        Unexpected::Signed(_) | Unexpected::Unsigned(_) => "an integer",
        Unexpected::Float(_) => "a float",
        Unexpected::Char(_) | Unexpected::Str(_) => "a string",
        Unexpected::Map => "a table",
        Unexpected::Seq => "an array",
        _ => "a value of another kind",
    }
}

/// `"text", "json"`.
fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One value of the tree.
struct Node(toml::Value);

impl<'de> de::Deserializer<'de> for Node {
    type Error = ShapeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ShapeError> {
        match self.0 {
            toml::Value::String(s) => visitor.visit_string(s),
            toml::Value::Integer(i) => visitor.visit_i64(i),
            toml::Value::Float(f) => visitor.visit_f64(f),
            toml::Value::Boolean(b) => visitor.visit_bool(b),
            toml::Value::Datetime(_) => Err(ShapeError::new(
                "dates and times are not used in this file".into(),
            )),
            toml::Value::Array(items) => visitor.visit_seq(Items(items.into_iter())),
            toml::Value::Table(table) => visitor.visit_map(Entries {
                iter: table.into_iter(),
                value: None,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ShapeError> {
        visitor.visit_some(self)
    }

    /// Enums of this file are words: a string naming a variant.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ShapeError> {
        match self.0 {
            toml::Value::String(s) => {
                let word: StringDeserializer<ShapeError> = s.into_deserializer();
                visitor.visit_enum(word)
            }
            _ => Err(ShapeError::new(format!(
                "expected one of {}",
                quoted(variants)
            ))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf unit unit_struct newtype_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

/// The items of an array; an error keeps the array's key.
struct Items(std::vec::IntoIter<toml::Value>);

impl<'de> SeqAccess<'de> for Items {
    type Error = ShapeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ShapeError> {
        self.0
            .next()
            .map(|item| seed.deserialize(Node(item)))
            .transpose()
    }
}

/// The entries of a table; an error in a value gets the entry's key in front.
struct Entries {
    iter: <toml::Table as IntoIterator>::IntoIter,
    value: Option<(String, toml::Value)>,
}

impl<'de> MapAccess<'de> for Entries {
    type Error = ShapeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ShapeError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        let name: StringDeserializer<ShapeError> = key.clone().into_deserializer();
        self.value = Some((key, value));
        seed.deserialize(name).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ShapeError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| ShapeError::new("a key without a value".into()))?;
        seed.deserialize(Node(value)).map_err(|mut error| {
            error.path.insert(0, key);
            error
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Shape {
        name: Option<String>,
        #[serde(default)]
        count: i64,
        #[serde(default)]
        words: Vec<String>,
        #[serde(default)]
        table: HashMap<String, String>,
        format: Option<super::super::LogFormat>,
    }

    fn error(text: &str) -> ShapeError {
        let value = toml::Value::Table(toml::from_str(text).unwrap());
        from_value::<Shape>(value).expect_err(text)
    }

    #[test]
    fn errors_carry_the_key_path_and_the_expected_type_only() {
        let cases = [
            (
                "name = 987654",
                "name",
                "expected a string, found an integer",
            ),
            (
                "count = \"s3cret\"",
                "count",
                "expected an integer, found a string",
            ),
            ("count = 1.5", "count", "expected an integer, found a float"),
            (
                "words = [\"a\", 987654]",
                "words",
                "expected a string, found an integer",
            ),
            (
                "words = \"s3cret\"",
                "words",
                "expected an array, found a string",
            ),
            (
                "table = { A = 987654 }",
                "table.A",
                "expected a string, found an integer",
            ),
            (
                "table = \"s3cret\"",
                "table",
                "expected a table, found a string",
            ),
            (
                "format = \"s3cret\"",
                "format",
                "expected one of \"text\", \"json\"",
            ),
            (
                "format = 987654",
                "format",
                "expected one of \"text\", \"json\"",
            ),
            ("s3cret = 1", "s3cret", "unknown key"),
            ("name = 1979-05-27", "name", "dates and times"),
        ];
        for (text, key, message) in cases {
            let e = error(text);
            assert_eq!(e.key(""), key, "{text}: {e}");
            assert!(e.message.starts_with(message), "{text}: {e}");
            let leaked = e.message.contains("987654") || e.message.contains("s3cret");
            assert!(!leaked, "{text}: {e}");
        }
        assert_eq!(error("table = { A = 1 }").key("account"), "account.table.A");
    }

    #[test]
    fn good_values_come_through() {
        let text = "name = \"n\"\ncount = 3\nwords = [\"a\", \"b\"]\ntable = { A = \"x\" }\nformat = \"json\"";
        let value = toml::Value::Table(toml::from_str(text).unwrap());
        let shape: Shape = from_value(value).unwrap();
        assert_eq!(shape.name.as_deref(), Some("n"));
        assert_eq!(shape.count, 3);
        assert_eq!(shape.words, ["a", "b"]);
        assert_eq!(shape.table["A"], "x");
        assert_eq!(shape.format, Some(super::super::LogFormat::Json));
    }
}
