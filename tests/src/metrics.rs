//! Reading the gateway's Prometheus text without a parser: one sample by name and labels.

/// The value of the sample `name{labels}` (`labels` as written between the braces, or empty for
/// a sample without labels), if `text` has it.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<u64> {
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&key)?.strip_prefix(' ')?.trim().parse().ok())
}
