//! Problems found in the config repository: what `check`, the API and the status page show.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How bad a problem is. Errors fail `gitfleet check`; warnings do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One finding about the repository, tied to a file and line where there is one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Problem {
    /// Path inside the repository, or a tag such as `refs/tags/gateway/v3`.
    pub file: Option<String>,
    /// 1-based line in `file`.
    pub line: Option<u32>,
    pub severity: Severity,
    pub message: String,
}

impl Problem {
    pub fn error(file: impl Into<String>, line: Option<u32>, message: impl Into<String>) -> Self {
        Self { file: Some(file.into()), line, severity: Severity::Error, message: message.into() }
    }

    pub fn warning(file: impl Into<String>, line: Option<u32>, message: impl Into<String>) -> Self {
        Self { file: Some(file.into()), line, severity: Severity::Warning, message: message.into() }
    }

    /// A problem that belongs to no file, such as an unreachable remote.
    pub fn general(severity: Severity, message: impl Into<String>) -> Self {
        Self { file: None, line: None, severity, message: message.into() }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line`, `file` or nothing: where a person should look.
    pub fn location(&self) -> String {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => format!("{file}:{line}"),
            (Some(file), None) => file.clone(),
            (None, _) => String::new(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let location = self.location();
        if location.is_empty() {
            write!(f, "{}: {}", self.severity, self.message)
        } else {
            write!(f, "{location}: {}: {}", self.severity, self.message)
        }
    }
}

/// 1-based line number of a byte offset in `text`.
pub fn line_of_offset(text: &str, offset: usize) -> u32 {
    let end = offset.min(text.len());
    let newlines = text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count();
    u32::try_from(newlines + 1).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_offset_counts_newlines_before_the_offset() {
        let text = "a\nbb\nccc";
        assert_eq!(line_of_offset(text, 0), 1);
        assert_eq!(line_of_offset(text, 2), 2);
        assert_eq!(line_of_offset(text, 5), 3);
        assert_eq!(line_of_offset(text, 999), 3);
    }

    #[test]
    fn display_puts_location_first() {
        let problem = Problem::error("fleets/prod.toml", Some(3), "unknown key `verison`");
        assert_eq!(problem.to_string(), "fleets/prod.toml:3: error: unknown key `verison`");
        let general = Problem::general(Severity::Warning, "remote unreachable");
        assert_eq!(general.to_string(), "warning: remote unreachable");
    }
}
