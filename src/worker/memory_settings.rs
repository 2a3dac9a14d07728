//! Memory settings as people write them, on the command line and in the site config file:
//! sizes (`4GiB`, `500MB`, `1024`), memory limits (`auto`, `0.25`, a size) and the
//! thresholds that are fractions of a limit (`0.6`, `false`).

use super::MemoryLimit;
use std::str::FromStr;

/// A threshold: a fraction of the memory limit, or `None` (given as `false`) for none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold(pub Option<f64>);

impl FromStr for Threshold {
    type Err = String;

    fn from_str(text: &str) -> Result<Threshold, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "false" | "none" | "off" => Ok(Threshold(None)),
            number => match number.parse::<f64>() {
                Ok(f) if f > 0.0 && f <= 1.0 => Ok(Threshold(Some(f))),
                _ => Err(format!(
                    "`{text}` is not a fraction of the memory limit (0 < f <= 1) nor `false`"
                )),
            },
        }
    }
}

impl FromStr for MemoryLimit {
    type Err = String;

    /// `auto`, a fraction of the node's memory (`0.25`), or a size (`4GiB`; `0`: no limit).
    fn from_str(text: &str) -> Result<MemoryLimit, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(MemoryLimit::Auto);
        }
        if let Ok(f) = text.parse::<f64>() {
            if f > 0.0 && f <= 1.0 && text.contains('.') {
                return Ok(MemoryLimit::Fraction(f));
            }
        }
        parse_bytes(text).map(MemoryLimit::Bytes)
    }
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (try 4GiB, 500MB or 1024)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    Ok((number * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_and_fractions_parse() {
        assert_eq!("auto".parse(), Ok(MemoryLimit::Auto));
        assert_eq!("0.25".parse(), Ok(MemoryLimit::Fraction(0.25)));
        assert_eq!("300MiB".parse(), Ok(MemoryLimit::Bytes(300 << 20)));
        assert_eq!("0".parse(), Ok(MemoryLimit::Bytes(0)));
        assert!("plenty".parse::<MemoryLimit>().is_err());
        assert_eq!("0.6".parse(), Ok(Threshold(Some(0.6))));
        assert_eq!("false".parse(), Ok(Threshold(None)));
        assert!("1.5".parse::<Threshold>().is_err());
        assert!("0".parse::<Threshold>().is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("1.5 kB"), Ok(1500));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
