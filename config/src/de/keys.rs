//! The message for a key a struct does not declare, with a suggestion when one is close.

/// `ScrapeConfig` → `scrape config`.
pub(super) fn humanize(type_name: &str) -> String {
    let mut out = String::new();
    for (i, c) in type_name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

pub(super) fn unknown_key_message(strukt: &str, key: &str, fields: &[&str]) -> String {
    let what = humanize(strukt);
    let close = fields
        .iter()
        .map(|f| (edit_distance(key, f), f))
        .filter(|(d, _)| *d <= 2 && *d * 3 <= key.len())
        .min_by_key(|(d, _)| *d);
    match close {
        Some((_, f)) => format!("unknown key `{key}` in {what} (did you mean `{f}`?)"),
        None => format!("unknown key `{key}` in {what} (expected one of: {})", fields.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_suggest_close_names() {
        let fields = ["job_name", "scrape_interval"];
        assert_eq!(
            unknown_key_message("ScrapeConfig", "scrape_intervall", &fields),
            "unknown key `scrape_intervall` in scrape config (did you mean `scrape_interval`?)"
        );
        assert_eq!(
            unknown_key_message("ScrapeConfig", "foo", &fields),
            "unknown key `foo` in scrape config (expected one of: job_name, scrape_interval)"
        );
    }
}
