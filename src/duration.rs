//! Durations as people write them in fleet files and flags: `30s`, `2m`, `36h`, `180d`, `1y`.

use std::time::Duration;

/// Parses `<number><unit>` with units `ms`, `s`, `m`, `h`, `d`, `w`, `y` (365 days).
/// Several parts may follow each other (`1h30m`). The error is a message for a person.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{text}` is not a duration (expected e.g. 30s, 2m, 36h, 180d, 1y)"));
        }
        let number: u64 = rest[..digits].parse().map_err(|_| format!("`{text}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_seconds: u64 = match &rest[..unit_len] {
            "ms" => {
                total += Duration::from_millis(number);
                rest = &rest[unit_len..];
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "y" => 365 * 86_400,
            "" => return Err(format!("`{text}` needs a unit (s, m, h, d, w or y)")),
            other => {
                return Err(format!("`{text}`: unknown unit `{other}` (use s, m, h, d, w or y)"));
            }
        };
        let seconds = number.checked_mul(unit_seconds).ok_or_else(|| format!("`{text}` is too long"))?;
        total = total.checked_add(Duration::from_secs(seconds)).ok_or_else(|| format!("`{text}` is too long"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// The shortest exact spelling of a duration in the units `parse_duration` reads.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if duration.subsec_millis() != 0 || seconds == 0 {
        return format!("{}ms", duration.as_millis());
    }
    for (unit, size) in [("y", 365 * 86_400), ("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if seconds % size == 0 {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_fleet_files_use() {
        let cases = [
            ("30s", 30),
            ("2m", 120),
            ("36h", 36 * 3600),
            ("180d", 180 * 86_400),
            ("1y", 365 * 86_400),
            ("2y", 2 * 365 * 86_400),
            ("1h30m", 5400),
            ("2w", 14 * 86_400),
        ];
        for (text, seconds) in cases {
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(seconds)), "{text}");
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        assert_eq!(parse_duration(""), Err("empty duration".to_owned()));
        assert_eq!(parse_duration("10"), Err("`10` needs a unit (s, m, h, d, w or y)".to_owned()));
        assert_eq!(parse_duration("3 days"), Err("`3 days`: unknown unit ` days` (use s, m, h, d, w or y)".to_owned()));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999y").is_err());
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(180 * 86_400)), "180d");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
