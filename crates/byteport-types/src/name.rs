//! Validated resource names.
//!
//! The rule, for every name BytePort accepts (users, projects, VMs, images,
//! flavors, nodes, tokens): 1 to 63 characters from `a-z`, `0-9`, `-` and
//! `.`; the first and last character are a letter or a digit; no `..`.
//! Names therefore never carry shell metacharacters, path separators or
//! whitespace, and are valid DNS labels when they hold no dot.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A name that passed [the rule](self).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// Why a string is not a valid name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} characters long; at most 63 are allowed")]
    TooLong(usize),
    #[error("name contains {0:?}; only a-z, 0-9, '-' and '.' are allowed")]
    BadChar(char),
    #[error("name must start and end with a letter or a digit")]
    BadEdge,
    #[error("name must not contain '..'")]
    DoubleDot,
}

impl Name {
    /// Checks `s` against the rule.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let len = s.chars().count();
        if len > 63 {
            return Err(NameError::TooLong(len));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '.'))
        {
            return Err(NameError::BadChar(c));
        }
        let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !edge_ok(s.chars().next()) || !edge_ok(s.chars().last()) {
            return Err(NameError::BadEdge);
        }
        if s.contains("..") {
            return Err(NameError::DoubleDot);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Name::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::parse(s)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl utoipa::PartialSchema for Name {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(63))
            .pattern(Some("^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$"))
            .description(Some(
                "1-63 characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit, no '..'",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Name {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "a",
            "web-1",
            "m1.tiny",
            "debian-12",
            "alpine-3.20",
            &"x".repeat(63),
        ] {
            assert!(Name::parse(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn rejects_each_rule_with_its_reason() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert_eq!(Name::parse(&"x".repeat(64)), Err(NameError::TooLong(64)));
        assert_eq!(Name::parse("Web"), Err(NameError::BadChar('W')));
        assert_eq!(Name::parse("a;rm -rf"), Err(NameError::BadChar(';')));
        assert_eq!(Name::parse("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(Name::parse("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(Name::parse("-a"), Err(NameError::BadEdge));
        assert_eq!(Name::parse("a."), Err(NameError::BadEdge));
        assert_eq!(Name::parse("a..b"), Err(NameError::DoubleDot));
    }
}
