//! Small predicates on names, patterns and addresses.

/// `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A replace target: label name characters and `$1`, `${1}`, `$name`, `${name}` references.
pub(super) fn valid_target_template(target: &str) -> bool {
    let mut rest = target;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("${") {
            let Some(end) = r.find('}') else { return false };
            let name = &r[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return false;
            }
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix('$') {
            let n = r.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').count();
            if n == 0 {
                return false;
            }
            rest = &r[n..];
        } else {
            let c = rest.chars().next().unwrap_or('_');
            if !(c.is_ascii_alphanumeric() || c == '_') {
                return false;
            }
            rest = &rest[c.len_utf8()..];
        }
    }
    target.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '$')
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
