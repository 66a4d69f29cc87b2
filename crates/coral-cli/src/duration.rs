//! Durations as `coral gc --grace` reads and prints them.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};

/// Parses a duration as `coral gc --grace` takes it: a number of seconds, or a number followed
/// by `s`, `m`, `h` or `d` (`0`, `90s`, `30m`, `1.5h`, `2d`).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit.trim() {
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => bail!("{text:?} is not a duration: give a number with s, m, h or d (0, 90s, 30m, 6h)"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| {
            anyhow!("{text:?} is not a duration: give a number with s, m, h or d (0, 90s, 30m, 6h)")
        })?;
    let secs = n * scale;
    if secs > 1e12 {
        bail!("{text:?} is too long a duration");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration as [`parse_duration`] reads it back: `0s`, `90s`, `30m`, `6h`, `2d`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{:.3}s", d.as_secs_f64())
    } else if s == 0 {
        "0s".to_owned()
    } else if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, secs) in [
            ("0", 0.0),
            ("90", 90.0),
            ("90s", 90.0),
            ("30m", 1800.0),
            ("6h", 21_600.0),
            ("1.5h", 5400.0),
            ("2d", 172_800.0),
            (" 5 min", 300.0),
        ] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_secs_f64(secs),
                "{text}"
            );
        }
        for bad in ["", "h", "-1s", "1x", "1e400", "nan", "1 week", "inf"] {
            let e = parse_duration(bad).unwrap_err().to_string();
            assert!(e.contains("duration"), "{bad}: {e}");
        }
        for (d, text) in [
            (0, "0s"),
            (90, "90s"),
            (1800, "30m"),
            (3600, "1h"),
            (86_400, "1d"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(d)), text);
            assert_eq!(parse_duration(text).unwrap(), Duration::from_secs(d));
        }
    }
}
