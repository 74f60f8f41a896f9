//! Small predicates on names, patterns and addresses.

/// `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A `replace` target label or a `labelmap` replacement that may use `$1`, `${1}`, `$name`,
/// `${name}`: Prometheus's own pattern for them (`relabelTarget`).
pub fn valid_target_template(target: &str) -> bool {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    PATTERN
        .get_or_init(|| {
            regex::Regex::new(r"^(?:(?:[a-zA-Z_]|\$(?:\{[0-9A-Za-z_]+\}|[0-9A-Za-z_]+))+[0-9A-Za-z_]*)+$")
                .expect("static regex")
        })
        .is_match(target)
}

/// A file_sd pattern: ends in `.json`, `.yml` or `.yaml`, with `*` only in the last element.
pub(super) fn valid_file_sd_pattern(p: &str) -> bool {
    let lower = p.to_ascii_lowercase();
    let ext_ok = [".json", ".yml", ".yaml"].iter().any(|e| lower.ends_with(e));
    let dir = p.rfind('/').map_or("", |i| &p[..i]);
    ext_ok && !dir.contains('*')
}

pub(super) fn valid_http_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or("");
        !host.is_empty() && !host.starts_with(':')
    })
}

pub(super) fn valid_listen_address(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
}

/// The last line of a regex error, which names the problem (`unclosed group`).
pub(super) fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(&text);
    line.trim().trim_start_matches("error: ").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_templates() {
        assert!(valid_target_template("foo"));
        assert!(valid_target_template("${1}"));
        assert!(valid_target_template("pre_$1_post"));
        assert!(!valid_target_template("a-b"));
        assert!(!valid_target_template("${"));
        assert!(!valid_target_template("1abc"));
    }

    #[test]
    fn file_sd_patterns() {
        assert!(valid_file_sd_pattern("targets/*.json"));
        assert!(valid_file_sd_pattern("a.YAML"));
        assert!(!valid_file_sd_pattern("*/a.json"));
        assert!(!valid_file_sd_pattern("targets.txt"));
    }
}
