//! Building blocks of the status page: escaping, the page frame, times, status badges.
//!
//! Every string that did not come from this file goes through `Text` (or `attr`) on its
//! way into a page: agents choose their host names, errors and attributes, and Git users
//! choose descriptions and notes.

use std::fmt::{self, Display, Write as _};

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::instance::Status;
use crate::status::Counts;

/// The page's security headers: no inline script can run, nothing can be framed or posted.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub const STYLESHEET: &str = include_str!("../../assets/gitfleet.css");
pub const SCRIPT: &str = include_str!("../../assets/gitfleet.js");

/// Text escaped for HTML element content and quoted attribute values.
pub struct Text<'a>(pub &'a str);

impl Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(index) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..index])?;
            f.write_str(match rest.as_bytes()[index] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[index + 1..];
        }
        f.write_str(rest)
    }
}

/// A problem message, escaped, with its `backticked` spans shown as code (a lone backtick
/// stays as it is).
pub struct Message<'a>(pub &'a str);

impl Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(open) = rest.find('`') {
            let Some(length) = rest[open + 1..].find('`') else { break };
            let code = &rest[open + 1..open + 1 + length];
            write!(f, "{}<code>{}</code>", Text(&rest[..open]), Text(code))?;
            rest = &rest[open + length + 2..];
        }
        Text(rest).fmt(f)
    }
}

/// `1 version`, `2 versions`.
pub fn count(n: usize, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// An optional string, escaped, or a muted dash.
pub struct OrDash<'a>(pub Option<&'a str>);

impl Display for OrDash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.filter(|text| !text.is_empty()) {
            Some(text) => Text(text).fmt(f),
            None => f.write_str("<span class=\"muted\">—</span>"),
        }
    }
}

/// A path segment or query value, percent-encoded (then safe in attributes too).
pub struct Url<'a>(pub &'a str);

impl Display for Url<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                f.write_char(byte as char)?;
            } else {
                write!(f, "%{byte:02X}")?;
            }
        }
        Ok(())
    }
}

/// A whole page: the frame, with `body` inside `<main>`.
pub fn page(title: &str, current: Nav, body: &str) -> Response {
    let mut html = String::with_capacity(body.len() + 2048);
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · gitfleet</title>\
         <link rel=\"stylesheet\" href=\"/assets/gitfleet.css\">\
         <noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript>\
         <script src=\"/assets/gitfleet.js\" defer></script></head>\
         <body><svg class=\"defs\" aria-hidden=\"true\" focusable=\"false\">\
         <pattern id=\"hatch-failed\" width=\"3\" height=\"1\" patternUnits=\"userSpaceOnUse\">\
         <rect width=\"2\" height=\"1\" class=\"s-failed\"/><rect x=\"2\" width=\"1\" height=\"1\" class=\"hatch\"/></pattern>\
         </svg><header class=\"top\"><a class=\"brand\" href=\"/\">gitfleet</a><nav>",
        Text(title)
    );
    for (nav, href, label) in [(Nav::Fleets, "/", "Fleets"), (Nav::Configs, "/configs", "Configurations")] {
        let current = if nav == current { " aria-current=\"page\"" } else { "" };
        let _ = write!(html, "<a href=\"{href}\"{current}>{label}</a>");
    }
    let _ = writeln!(
        html,
        "<a href=\"/api/v1/fleets\">API</a><a href=\"/metrics\">Metrics</a></nav>\
         <span class=\"live\" data-state=\"static\">refreshes every 10 s</span></header>\
         <main>{body}</main><footer>Read-only. Change the fleet with <code>git push</code>.</footer></body></html>"
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// Which top-level section a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleets,
    Configs,
}

/// `<time>` with a relative text (kept fresh by the script) and the exact UTC time on hover.
pub struct Time {
    pub unix_seconds: i64,
    pub now: i64,
}

impl Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exact = crate::time::rfc3339(self.unix_seconds);
        let title = exact.replace('T', " ").replace('Z', " UTC");
        write!(f, "<time datetime=\"{exact}\" title=\"{title}\">{}</time>", relative(self.now - self.unix_seconds))
    }
}

/// "3 min ago", "in 2 days", "just now".
pub fn relative(seconds: i64) -> String {
    let magnitude = seconds.unsigned_abs();
    if magnitude < 5 {
        return "just now".to_owned();
    }
    let (count, unit) = match magnitude {
        m if m >= 86_400 => (m / 86_400, if m / 86_400 == 1 { "day" } else { "days" }),
        m if m >= 3_600 => (m / 3_600, "h"),
        m if m >= 60 => (m / 60, "min"),
        m => (m, "s"),
    };
    if seconds >= 0 { format!("{count} {unit} ago") } else { format!("in {count} {unit}") }
}

pub fn status_label(status: Status) -> &'static str {
    match status {
        Status::InSync => "in sync",
        Status::Pending => "pending",
        Status::Applying => "applying",
        Status::Failed => "failed",
        Status::Stale => "stale",
        Status::Observed => "observed",
    }
}

/// A status badge: symbol, colour and word.
pub struct Badge(pub Status);

impl Display for Badge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<span class=\"badge s-{}\">{}</span>", self.0.as_str(), status_label(self.0))
    }
}

/// The order statuses appear in on the page: converged, converging, not converging.
pub const STATUSES: [Status; 6] =
    [Status::InSync, Status::Applying, Status::Pending, Status::Failed, Status::Stale, Status::Observed];

/// A bar of instance statuses, each segment as wide as its share, with an accessible
/// summary.
pub struct Bar<'a>(pub &'a Counts);

impl Display for Bar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let segments: Vec<(&str, usize, &str)> =
            STATUSES.iter().map(|s| (s.as_str(), self.0.get(*s), status_label(*s))).collect();
        bar(f, &segments)
    }
}

/// A fleet's bar during a rollout: in sync on the new version, held back on the version
/// before (never green), and what failed, moves or is away.
pub struct RolloutBar<'a> {
    pub counts: &'a Counts,
    /// In sync with the new version.
    pub on_new: usize,
}

impl Display for RolloutBar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = self.counts;
        let moving = counts.pending + counts.applying;
        let held = counts.total().saturating_sub(self.on_new + counts.failed + counts.stale + moving);
        bar(
            f,
            &[
                ("in_sync", self.on_new, "on the new version"),
                ("held", held, "held on the version before"),
                ("pending", moving, "moving"),
                ("failed", counts.failed, status_label(Status::Failed)),
                ("stale", counts.stale, status_label(Status::Stale)),
            ],
        )
    }
}

/// A bar of `(class, count, label)` segments, labelled for screen readers.
fn bar(f: &mut fmt::Formatter<'_>, segments: &[(&str, usize, &str)]) -> fmt::Result {
    let total: usize = segments.iter().map(|(_, count, _)| count).sum();
    let summary: Vec<String> = segments
        .iter()
        .filter(|(_, count, _)| *count > 0)
        .map(|(_, count, label)| format!("{count} {label}"))
        .collect();
    let label = if summary.is_empty() { "no instances".to_owned() } else { summary.join(", ") };
    // SVG attributes, not inline styles: the page's policy allows no inline style.
    write!(
        f,
        "<svg class=\"bar\" viewBox=\"0 0 100 1\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{label}\">\
         <title>{label}</title>"
    )?;
    let mut x = 0.0;
    for (class, count, _) in segments {
        if *count > 0 {
            let width = *count as f64 * 100.0 / total as f64;
            write!(f, "<rect class=\"s-{class}\" x=\"{x:.3}\" width=\"{width:.3}\" height=\"1\"/>")?;
            x += width;
        }
    }
    f.write_str("</svg>")
}

/// The first 12 characters of a hash or commit, in monospace, whole on hover.
pub struct Short<'a>(pub Option<&'a str>);

impl Display for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.filter(|text| !text.is_empty()) {
            Some(text) => {
                let short = text.get(..12).unwrap_or(text);
                write!(f, "<code title=\"{}\">{}</code>", Text(text), Text(short))
            }
            None => f.write_str("<span class=\"muted\">—</span>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_agents_send() {
        assert_eq!(
            Text("<img src=x onerror=alert(1)> & \"quotes\" 'too'").to_string(),
            "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quotes&quot; &#39;too&#39;"
        );
        assert_eq!(OrDash(Some("<b>")).to_string(), "&lt;b&gt;");
        assert_eq!(OrDash(None).to_string(), "<span class=\"muted\">—</span>");
        assert_eq!(Url("gateway/v1 \"x\"<").to_string(), "gateway%2Fv1%20%22x%22%3C");
        assert_eq!(
            Short(Some("<abcdefghijklmnop")).to_string(),
            "<code title=\"&lt;abcdefghijklmnop\">&lt;abcdefghijk</code>"
        );
    }

    #[test]
    fn messages_show_backticked_spans_as_code() {
        assert_eq!(
            Message("fleet `prod`: `<x>` is not published").to_string(),
            "fleet <code>prod</code>: <code>&lt;x&gt;</code> is not published"
        );
        assert_eq!(Message("a lone ` stays & is escaped").to_string(), "a lone ` stays &amp; is escaped");
        assert_eq!(Message("``").to_string(), "<code></code>");
        assert_eq!(count(1, "version", "versions"), "1 version");
        assert_eq!(count(0, "version", "versions"), "0 versions");
    }

    #[test]
    fn relative_times() {
        let cases = [
            (0, "just now"),
            (42, "42 s ago"),
            (125, "2 min ago"),
            (7_300, "2 h ago"),
            (86_400, "1 day ago"),
            (-172_800, "in 2 days"),
        ];
        for (seconds, text) in cases {
            assert_eq!(relative(seconds), text);
        }
    }

    #[test]
    fn bars_say_what_they_show() {
        let counts = Counts { in_sync: 3, failed: 1, ..Default::default() };
        let bar = Bar(&counts).to_string();
        assert!(bar.contains("aria-label=\"3 in sync, 1 failed\""), "{bar}");
        assert!(bar.contains("<rect class=\"s-in_sync\" x=\"0.000\" width=\"75.000\" height=\"1\"/>"), "{bar}");
        assert!(bar.contains("<rect class=\"s-failed\" x=\"75.000\" width=\"25.000\" height=\"1\"/>"), "{bar}");
        assert!(Bar(&Counts::default()).to_string().contains("no instances"));
    }
}
