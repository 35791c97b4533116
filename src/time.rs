//! Wall-clock times as scap shows them: UTC, `YYYY-MM-DD HH:MM:SSZ`.

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Formats Unix seconds as UTC (proleptic Gregorian, no leap seconds).
pub fn fmt_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// "20s", "20", "2m", "1h" (or "30m" under `nohup`), "200ms" as a
/// duration.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || {
        format!(
            "{s:?} is not a duration: use seconds (20 or 20s), minutes (2m), hours (1h) or milliseconds (200ms)"
        )
    };
    let t = s.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    if unit == "ms" {
        return Ok(std::time::Duration::from_millis(n)).and_then(|d| {
            if d.as_secs() <= 30 * 86_400 {
                Ok(d)
            } else {
                Err(bad())
            }
        });
    }
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
    .filter(|&s| s <= 30 * 86_400)
    .ok_or_else(bad)?;
    Ok(std::time::Duration::from_secs(secs))
}

/// `secs` as `20261127T083012Z`: sortable, and safe in IDs and file names.
pub fn fmt_compact(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (y, m, d).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Formats a byte count for people: `412.3 MB` (powers of 1000, like df -H).
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(fmt_compact(1_795_000_000), "20261118T110640Z");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(fmt_utc(1_795_000_000), "2026-11-18 11:06:40Z");
        assert_eq!(fmt_bytes(999), "999 B");
        assert_eq!(fmt_bytes(412_345_678), "412.3 MB");
    }
}
