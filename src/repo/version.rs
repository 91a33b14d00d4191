//! Version ordering: semver-aware where versions look like semver, natural otherwise.
//!
//! `v7 < v10`, `1.4.0 < 1.10.0`, `1.0.0-rc.1 < 1.0.0`, and build metadata (`+...`) only
//! breaks ties. `latest` is the highest version under this order.

use std::cmp::Ordering;

/// Compares two version names.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (a_main, a_build) = split_build(a);
    let (b_main, b_build) = split_build(b);
    let (a_core, a_pre) = split_prerelease(a_main);
    let (b_core, b_pre) = split_prerelease(b_main);
    natural_compare(a_core, b_core)
        .then_with(|| match (a_pre, b_pre) {
            (None, None) => Ordering::Equal,
            // A pre-release sorts before the release it precedes.
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a_pre), Some(b_pre)) => natural_compare(a_pre, b_pre),
        })
        .then_with(|| natural_compare(a_build, b_build))
        .then_with(|| a.cmp(b))
}

fn split_build(version: &str) -> (&str, &str) {
    version.split_once('+').unwrap_or((version, ""))
}

/// Splits `1.0.0-rc.1` into `1.0.0` and `rc.1`, but only when the part before the dash
/// looks like a dotted number (so `2024-01-05` stays one natural string).
fn split_prerelease(version: &str) -> (&str, Option<&str>) {
    let Some((core, pre)) = version.split_once('-') else {
        return (version, None);
    };
    let digits = core.strip_prefix(['v', 'V']).unwrap_or(core);
    let looks_numeric = !digits.is_empty()
        && digits.split('.').all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    if looks_numeric && !pre.is_empty() { (core, Some(pre)) } else { (version, None) }
}

/// Natural order: runs of digits compare as numbers, everything else as text (ignoring
/// ASCII case), so `v9 < v10`.
fn natural_compare(a: &str, b: &str) -> Ordering {
    let mut a_chunks = chunks(a);
    let mut b_chunks = chunks(b);
    loop {
        match (a_chunks.next(), b_chunks.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(a_chunk), Some(b_chunk)) => {
                let order =
                    match (a_chunk.bytes().all(|b| b.is_ascii_digit()), b_chunk.bytes().all(|b| b.is_ascii_digit())) {
                        (true, true) => compare_digit_runs(a_chunk, b_chunk),
                        // Numbers sort before words, as in semver pre-release identifiers.
                        (true, false) => Ordering::Less,
                        (false, true) => Ordering::Greater,
                        (false, false) => a_chunk
                            .bytes()
                            .map(|b| b.to_ascii_lowercase())
                            .cmp(b_chunk.bytes().map(|b| b.to_ascii_lowercase())),
                    };
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

fn compare_digit_runs(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Splits text into maximal runs of digits and of non-digits.
fn chunks(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let digit = first.is_ascii_digit();
        let end = rest.find(|c: char| c.is_ascii_digit() != digit).unwrap_or(rest.len());
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut versions: Vec<&str>) -> Vec<&str> {
        versions.sort_by(|a, b| compare_versions(a, b));
        versions
    }

    #[test]
    fn numbers_compare_as_numbers() {
        assert_eq!(sorted(vec!["v10", "v2", "v1", "v9"]), vec!["v1", "v2", "v9", "v10"]);
        assert_eq!(sorted(vec!["1.10.0", "1.4.0", "1.4.10", "1.4.2"]), vec!["1.4.0", "1.4.2", "1.4.10", "1.10.0"]);
    }

    #[test]
    fn prereleases_come_before_their_release() {
        assert_eq!(
            sorted(vec!["1.0.0", "1.0.0-rc.2", "1.0.0-alpha", "1.0.0-rc.10", "0.9.9"]),
            vec!["0.9.9", "1.0.0-alpha", "1.0.0-rc.2", "1.0.0-rc.10", "1.0.0"]
        );
        assert_eq!(compare_versions("v2.0.0-rc1", "v2.0.0"), Ordering::Less);
    }

    #[test]
    fn dates_are_not_mistaken_for_prereleases() {
        assert_eq!(
            sorted(vec!["2024-10-01", "2024-09-30", "2025-01-01"]),
            vec!["2024-09-30", "2024-10-01", "2025-01-01"]
        );
    }

    #[test]
    fn build_metadata_only_breaks_ties_and_order_is_total() {
        assert_eq!(compare_versions("1.0.0+b2", "1.0.1"), Ordering::Less);
        assert_eq!(compare_versions("1.0.0+b2", "1.0.0+b10"), Ordering::Less);
        assert_eq!(compare_versions("v01", "v1"), Ordering::Less);
        assert_eq!(compare_versions("v1", "v1"), Ordering::Equal);
    }
}
