//! Human input for sizes and money: `4GiB`, `512MiB`, `0.012` (currency units).

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnitError {
    #[error("`{0}` is not a size; use a number with a unit such as 512MiB, 4GiB or 1TiB")]
    Size(String),
    #[error("`{0}` is not an amount of money; use a decimal such as 0.012 (at most 6 decimals)")]
    Money(String),
    #[error("`{0}` is not a duration; use a whole number with a unit such as 90s, 30m, 2h or 7d")]
    Duration(String),
}

/// Parses a duration into seconds: `90s`, `30m`, `2h`, `7d` (a bare number is seconds).
pub fn parse_duration_secs(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::Duration(text.into()))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(UnitError::Duration(text.into())),
    };
    match n.checked_mul(mult) {
        Some(secs) if secs > 0 => Ok(secs),
        _ => Err(UnitError::Duration(text.into())),
    }
}

/// Parses a size into MiB. A bare number is taken in `default_unit_mib` units (1 for
/// memory given in MiB, 1024 for disk given in GiB).
pub fn parse_size_mib(text: &str, default_unit_mib: u64) -> Result<u64, UnitError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::Size(text.into()))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" => default_unit_mib,
        "m" | "mi" | "mib" | "mb" => 1,
        "g" | "gi" | "gib" | "gb" => 1024,
        "t" | "ti" | "tib" | "tb" => 1024 * 1024,
        _ => return Err(UnitError::Size(text.into())),
    };
    n.checked_mul(mult).ok_or_else(|| UnitError::Size(text.into()))
}

/// Parses a size into whole GiB (rounding up), bare numbers being GiB.
pub fn parse_size_gib(text: &str) -> Result<u64, UnitError> {
    Ok(parse_size_mib(text, 1024)?.div_ceil(1024))
}

/// Parses a decimal amount of currency into integer micro-units, exactly (no floats).
pub fn parse_micros(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let err = || UnitError::Money(text.into());
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 6 {
        return Err(err());
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err())? };
    let frac_micros: u64 = format!("{frac:0<6}").parse().map_err(|_| err())?;
    whole.checked_mul(1_000_000).and_then(|w| w.checked_add(frac_micros)).ok_or_else(err)
}

/// Formats micro-units as a decimal with 6 places, trailing zeros trimmed to 2.
pub fn format_micros(micros: u64) -> String {
    let s = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    let trimmed = s.trim_end_matches('0');
    let dot = trimmed.find('.').unwrap_or(trimmed.len());
    if trimmed.len() - dot < 3 {
        format!("{}.{:02}", micros / 1_000_000, (micros % 1_000_000) / 10_000)
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512MiB", 1), Ok(512));
        assert_eq!(parse_size_mib("4GiB", 1), Ok(4096));
        assert_eq!(parse_size_mib("4G", 1), Ok(4096));
        assert_eq!(parse_size_mib("2", 1024), Ok(2048));
        assert_eq!(parse_size_gib("20GiB"), Ok(20));
        assert_eq!(parse_size_gib("1500MiB"), Ok(2));
        assert!(parse_size_mib("4 potatoes", 1).is_err());
        assert!(parse_size_mib("-1G", 1).is_err());
        assert!(parse_size_mib("99999999999999999999T", 1).is_err());
    }

    #[test]
    fn money() {
        assert_eq!(parse_micros("0.012"), Ok(12_000));
        assert_eq!(parse_micros("1"), Ok(1_000_000));
        assert_eq!(parse_micros(".5"), Ok(500_000));
        assert_eq!(parse_micros("0.000001"), Ok(1));
        assert!(parse_micros("0.0000001").is_err());
        assert!(parse_micros("1e3").is_err());
        assert!(parse_micros("").is_err());
        assert!(parse_micros(".").is_err());
        assert_eq!(format_micros(12_700), "0.0127");
        assert_eq!(format_micros(1_500_000), "1.50");
        assert_eq!(format_micros(0), "0.00");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("2h"), Ok(7200));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        for bad in ["", "0s", "1.5h", "-1h", "3 fortnights", "99999999999999999999d"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad:?}");
        }
    }
}
