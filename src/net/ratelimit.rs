//! Bandwidth caps: a token bucket of bytes per second, shared by every
//! response of `scap serve` (`--max-rate`) or every fetch of an agent
//! (`--max-fetch-rate`), so a train never saturates the deploy host's link
//! or a host's.

use std::time::Duration;

use tokio::time::Instant;

/// A byte-rate limit. Takes may overdraw the bucket; the next taker waits
/// for the debt (so one large take is paced, not refused).
#[derive(Debug)]
pub struct RateLimit {
    /// Bytes per second.
    rate: f64,
    /// (tokens, when last refilled). At most one second of burst.
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> RateLimit {
        let rate = bytes_per_second.max(1) as f64;
        RateLimit {
            rate,
            state: tokio::sync::Mutex::new((rate, Instant::now())),
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.rate as u64
    }

    /// Accounts for `n` bytes, waiting as long as the rate requires.
    pub async fn take(&self, n: usize) {
        let mut s = self.state.lock().await;
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.rate);
        s.1 = now;
        s.0 -= n as f64;
        if s.0 < 0.0 {
            let wait = Duration::from_secs_f64(-s.0 / self.rate);
            // Holding the lock: takers queue behind the debt, in order.
            tokio::time::sleep(wait).await;
            s.0 = 0.0;
            s.1 = Instant::now();
        }
    }
}

/// Parses a rate: bytes per second, with an optional k, M or G (powers of
/// 1000; `Ki`, `Mi`, `Gi` for 1024) and an optional `B` or `B/s`:
/// `100M`, `1.5G`, `500kB/s`, `64MiB`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad =
        || format!("{s:?} is not a rate: give bytes per second, e.g. 100M (100 MB/s), 500k, 1G");
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t.strip_suffix('B').unwrap_or(t);
    let (num, mult) = if let Some(n) = t.strip_suffix("Ki") {
        (n, 1024.0)
    } else if let Some(n) = t.strip_suffix("Mi") {
        (n, 1024.0 * 1024.0)
    } else if let Some(n) = t.strip_suffix("Gi") {
        (n, 1024.0 * 1024.0 * 1024.0)
    } else if let Some(n) = t.strip_suffix(['k', 'K']) {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix('M') {
        (n, 1e6)
    } else if let Some(n) = t.strip_suffix('G') {
        (n, 1e9)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 {
        return Err(bad());
    }
    let bytes = v * mult;
    if bytes < 1024.0 {
        return Err(format!(
            "{s:?}: under 1 KB/s: nothing would ever finish; give at least 1k"
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("500kB/s"), Ok(500_000));
        assert_eq!(parse_rate("64MiB"), Ok(64 << 20));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("10").is_err(), "10 bytes/s is a mistake");
    }

    #[tokio::test]
    async fn paces() {
        let l = RateLimit::new(1_000_000);
        let t = Instant::now();
        for _ in 0..3 {
            l.take(1_000_000).await;
        }
        // One second of burst, then two seconds of debt.
        let e = t.elapsed().as_secs_f64();
        assert!((1.8..3.5).contains(&e), "{e}");
    }
}
