//! The safe alphabet for fleet, configuration and version names.
//!
//! Names end up in file paths, URLs and tag names, so they are restricted before anything
//! else sees them: no path traversal, no separators, nothing a shell or URL would mangle.

const MAX_NAME_LEN: usize = 63;

/// Fleet and configuration names: lowercase ASCII letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit, at most 63 characters.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name `{}` is longer than {MAX_NAME_LEN} characters", printable(name)));
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!("name `{}` must start with a lowercase letter or a digit", printable(name)));
    }
    if let Some(bad) =
        name.chars().find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "name `{}` contains `{}`; use lowercase letters, digits, `-`, `_` and `.`",
            printable(name),
            bad.escape_default()
        ));
    }
    Ok(())
}

/// Version names (the part of a tag after the first `/`): ASCII letters, digits, `-`, `_`,
/// `.` and `+`, starting with a letter or digit, at most 63 characters, not `latest`.
pub fn check_version(version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err("version is empty".to_owned());
    }
    if version.len() > MAX_NAME_LEN {
        return Err(format!("version `{}` is longer than {MAX_NAME_LEN} characters", printable(version)));
    }
    if version == "latest" {
        return Err("`latest` is reserved: it means the highest published version".to_owned());
    }
    if !version.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!("version `{}` must start with a letter or a digit", printable(version)));
    }
    if let Some(bad) = version.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))) {
        return Err(format!(
            "version `{}` contains `{}`; use letters, digits, `-`, `_`, `.` and `+`",
            printable(version),
            bad.escape_default()
        ));
    }
    Ok(())
}

/// A name as it can be shown safely in one line of a message.
fn printable(name: &str) -> String {
    name.chars().take(80).flat_map(char::escape_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["prod", "prod-gateway", "node_agent", "edge.eu-1", "9lives"] {
            assert_eq!(check_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_names_that_could_escape_or_confuse() {
        for name in ["", "..", "../etc", "a/b", "Prod", "-x", ".hidden", "a b", "x\u{0}", "é"] {
            assert!(check_name(name).is_err(), "{name:?} should be rejected");
        }
        assert!(check_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn versions_allow_semver_and_reject_latest() {
        for version in ["v7", "1.4.0", "1.0.0-rc.1", "2.0.0+build.5", "V2"] {
            assert_eq!(check_version(version), Ok(()), "{version}");
        }
        for version in ["", "latest", "a/b", "-1", "v 1", "v1~"] {
            assert!(check_version(version).is_err(), "{version:?} should be rejected");
        }
    }
}
