//! Human sizes: `10G`, `64K`, `512` (bytes), `1.5G`; suffixes are powers of 1024, with an
//! optional `i`/`iB`/`B` (`64KiB`, `64KB` mean the same).

/// Parses a size in bytes.
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an empty size".into());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use K, M, G, T or bytes)"
            ))
        }
    };
    let bytes = if let Some((int, frac)) = num.split_once('.') {
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| format!("{s:?} is not a size"))?
        };
        if frac.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{s:?} is not a size"));
        }
        let scale = 10u64.pow(frac.len() as u32);
        let frac: u64 = frac.parse().map_err(|_| format!("{s:?} is not a size"))?;
        let whole = int.checked_shl(shift).filter(|v| v >> shift == int);
        let part = (u128::from(frac) << shift) / u128::from(scale);
        whole
            .and_then(|w| w.checked_add(u64::try_from(part).ok()?))
            .ok_or_else(|| format!("{s:?} is too large"))?
    } else {
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
        n.checked_shl(shift)
            .filter(|v| v >> shift == n)
            .ok_or_else(|| format!("{s:?} is too large"))?
    };
    Ok(bytes)
}

/// Formats bytes the short way: exact in the largest unit that divides them, else one decimal.
pub fn format(bytes: u64) -> String {
    const UNITS: [(&str, u32); 5] = [("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (u, shift) in UNITS {
        if bytes >= 1 << shift {
            if bytes.is_multiple_of(1 << shift) {
                return format!("{}{u}", bytes >> shift);
            }
            return format!("{:.1}{u}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_fractions() {
        assert_eq!(parse("512"), Ok(512));
        assert_eq!(parse("64K"), Ok(64 << 10));
        assert_eq!(parse("64k"), Ok(64 << 10));
        assert_eq!(parse("64KiB"), Ok(64 << 10));
        assert_eq!(parse("10G"), Ok(10 << 30));
        assert_eq!(parse("1.5G"), Ok(3 << 29));
        assert_eq!(parse(" 2 M "), Ok(2 << 20));
        assert_eq!(parse("1T"), Ok(1 << 40));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            "G",
            "1X",
            "-1",
            "1.2.3",
            "99999999999999999999",
            "16777216T",
            "1.",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn formats_short() {
        assert_eq!(format(512), "512B");
        assert_eq!(format(64 << 10), "64K");
        assert_eq!(format(3 << 29), "1.5G");
        assert_eq!(format(10 << 30), "10G");
    }
}
