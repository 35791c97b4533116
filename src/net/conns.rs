//! Connection limits for every scap server (`scap serve`, its dashboard,
//! the agent's API): no peer can hold a server's file descriptors or keep
//! a valid client out by opening connections and sending nothing.
//!
//! Every accepted connection gets a [`Slot`] before its TLS handshake. A
//! slot is **idle** while no request is in flight on it; it is **busy**
//! from the moment a request's head is read until its response body is
//! sent (or dropped).
//!
//! - An idle connection is closed [`Limits::idle`] after it opened or its
//!   last request ended, whatever bytes it dribbles meanwhile (a slow
//!   header, a handshake that never ends: slowloris).
//! - A busy connection whose request waits on its client (the request
//!   body not coming, or the answer not being read) is closed after
//!   [`Limits::idle`] of that; one whose request waits on the server (a
//!   sync at work, a pack being built) only when no byte moved either way
//!   for [`Limits::stall`]. So a client holds a busy connection only while
//!   the server works for it.
//! - At most [`Limits::max_per_peer`] connections per IP address and
//!   [`Limits::max_total`] in all. A new connection over a cap takes the
//!   place of the oldest idle one (of that peer, or of anyone): a flood of
//!   idle connections only ever evicts itself, and a client that sends a
//!   request at once always gets in. When every connection is busy, the new
//!   one is closed at once (the client retries; the server's own fds are
//!   never exhausted, so `accept` keeps working).
//!
//! The caps are set below the process's open-files limit
//! ([`Limits::within_fd_limit`]), which `scap serve` and the agent raise
//! to the hard limit at start ([`crate::sys::raise_open_files_limit`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a server treats its connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// An idle connection (no request in flight) is closed this long after
    /// it opened or its last request ended. Also the time a client has to
    /// send a request head.
    pub idle: Duration,
    /// A busy connection is closed when no byte moved for this long (two
    /// hours: a slow reader is otherwise bounded by the caps).
    pub stall: Duration,
    /// Connections at once, from everyone.
    pub max_total: usize,
    /// Connections at once from one IP address.
    pub max_per_peer: usize,
}

/// File descriptors a server keeps for itself (store files, hooks, the
/// connections it makes) below its open-files limit.
const FDS_KEPT: u64 = 256;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle: Duration::from_secs(60),
            // Longer than any request may legitimately run with no byte
            // moving: an agent's sync answers only when done, and its
            // fetch deadline is 30 minutes.
            stall: Duration::from_secs(2 * 3600),
            max_total: 8192,
            max_per_peer: 512,
        }
    }
}

impl Limits {
    /// These limits with the caps lowered to fit `nofile` open files (the
    /// soft limit): [`FDS_KEPT`] for the server's own files, and of the
    /// rest a quarter for the connections it makes (the dashboard's polls
    /// of every agent, a standby's fetches) and its small dashboard
    /// listener ([`Limits::dashboard`]).
    pub fn within_fd_limit(mut self, nofile: u64) -> Limits {
        let room = (nofile.saturating_sub(FDS_KEPT) / 4 * 3).max(16) as usize;
        self.max_total = self.max_total.min(room);
        self.max_per_peer = self.max_per_peer.min(self.max_total);
        self
    }

    /// The dashboard's listener: a few browsers and a Prometheus.
    pub fn dashboard(self) -> Limits {
        Limits {
            max_total: 64,
            max_per_peer: 32,
            ..self
        }
    }

    /// [`Limits::within_fd_limit`] with this process's soft limit.
    pub fn for_this_process(self) -> Limits {
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        self.within_fd_limit(lim.current.unwrap_or(u64::MAX))
    }
}

/// What the per-peer caps count by: an IPv4 address, or an IPv6 /64 (a
/// single host is often given a whole /64, and could otherwise open the
/// per-peer cap from each of its addresses).
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// One connection's standing.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    ip: Option<IpAddr>,
    in_flight: AtomicU32,
    /// Milliseconds since the tracker started: when it opened or its last
    /// request began or ended.
    last_request: AtomicU64,
    /// ... when a byte last moved.
    last_io: AtomicU64,
    /// ... since when the request in flight waits on the client (its body,
    /// or room to write the answer); 0: it does not.
    waiting: AtomicU64,
    killed: AtomicBool,
    kill: tokio::sync::Notify,
    /// The tracker's clock.
    epoch: Instant,
}

impl Slot {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A byte moved.
    pub fn touch(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// The request waits on the client (`true`: its body has not come,
    /// or the answer cannot be written), or no longer (`false`).
    pub fn waits_on_client(&self, waits: bool) {
        if waits {
            let now = self.now().max(1);
            let _ = self
                .waiting
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        } else {
            self.waiting.store(0, Ordering::Relaxed);
        }
    }

    /// A request began; the returned guard ends it when dropped (with the
    /// response body).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let now = self.now();
        self.last_request.store(now, Ordering::Relaxed);
        self.last_io.store(now, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Resolves when the tracker closes this connection.
    pub async fn killed(&self) {
        if self.killed.load(Ordering::SeqCst) {
            return;
        }
        self.kill.notified().await;
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.kill.notify_one();
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// A request in flight on a slot (see [`Slot::begin`]).
#[derive(Debug)]
pub struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        let now = self.0.now();
        self.0.last_request.store(now, Ordering::Relaxed);
        self.0.last_io.store(now, Ordering::Relaxed);
    }
}

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub accepted: AtomicU64,
    /// Closed to make room for a new connection.
    pub evicted: AtomicU64,
    /// Closed at once: every connection was busy.
    pub refused: AtomicU64,
    /// Closed for being idle or stalled too long.
    pub timed_out: AtomicU64,
}

#[derive(Default)]
struct Table {
    slots: HashMap<u64, Arc<Slot>>,
    per_ip: HashMap<IpAddr, usize>,
}

/// The connections of one server.
pub struct Tracker {
    limits: Limits,
    epoch: Instant,
    next: AtomicU64,
    table: Mutex<Table>,
    pub stats: ConnStats,
}

/// A connection's place in the tracker, freed when dropped.
pub struct SlotGuard {
    pub slot: Arc<Slot>,
    tracker: Arc<Tracker>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.tracker.remove(&self.slot);
    }
}

impl Tracker {
    /// A tracker for `limits`; its reaper (closing idle and stalled
    /// connections) runs on the current runtime until the tracker goes.
    pub fn new(limits: Limits) -> Arc<Tracker> {
        let t = Arc::new(Tracker {
            limits,
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
            stats: ConnStats::default(),
        });
        let weak = Arc::downgrade(&t);
        let tick = (limits.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(t) = weak.upgrade() else { return };
                t.reap();
            }
        });
        t
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.table.lock().expect("not poisoned").slots.len()
    }

    /// A place for a new connection from `ip`, evicting the oldest idle
    /// connection over a cap; `None` when every connection it could take
    /// the place of is busy (close the new one).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Option<SlotGuard> {
        let mut t = self.table.lock().expect("not poisoned");
        if let Some(ip) = ip
            && t.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_peer
            && !self.evict_oldest_idle(&mut t, Some(ip))
        {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if t.slots.len() >= self.limits.max_total && !self.evict_oldest_idle(&mut t, None) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let slot = Arc::new(Slot {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            ip,
            in_flight: AtomicU32::new(0),
            last_request: AtomicU64::new(now),
            last_io: AtomicU64::new(now),
            waiting: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            kill: tokio::sync::Notify::new(),
            epoch: self.epoch,
        });
        t.slots.insert(slot.id, slot.clone());
        if let Some(ip) = ip {
            *t.per_ip.entry(ip).or_default() += 1;
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Some(SlotGuard {
            slot,
            tracker: self.clone(),
        })
    }

    /// Closes the idle connection (of `ip`, or of anyone) whose last
    /// request is oldest; whether there was one.
    fn evict_oldest_idle(&self, t: &mut Table, ip: Option<IpAddr>) -> bool {
        let oldest = t
            .slots
            .values()
            .filter(|s| s.idle() && (ip.is_none() || s.ip == ip))
            .min_by_key(|s| s.last_request.load(Ordering::Relaxed))
            .cloned();
        let Some(s) = oldest else {
            return false;
        };
        Self::forget(t, &s);
        s.kill();
        self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn forget(t: &mut Table, s: &Slot) {
        if t.slots.remove(&s.id).is_some()
            && let Some(ip) = s.ip
            && let Some(n) = t.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&ip);
            }
        }
    }

    fn remove(&self, s: &Slot) {
        let mut t = self.table.lock().expect("not poisoned");
        Self::forget(&mut t, s);
    }

    /// Closes connections idle or stalled too long.
    fn reap(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle = self.limits.idle.as_millis() as u64;
        let stall = self.limits.stall.as_millis() as u64;
        let mut t = self.table.lock().expect("not poisoned");
        let expired: Vec<Arc<Slot>> = t
            .slots
            .values()
            .filter(|s| {
                if s.idle() {
                    return now.saturating_sub(s.last_request.load(Ordering::Relaxed)) > idle;
                }
                let waiting = s.waiting.load(Ordering::Relaxed);
                (waiting != 0 && now.saturating_sub(waiting) > idle)
                    || now.saturating_sub(s.last_io.load(Ordering::Relaxed)) > stall
            })
            .cloned()
            .collect();
        for s in expired {
            Self::forget(&mut t, &s);
            s.kill();
            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_peer: usize) -> Limits {
        Limits {
            idle: Duration::from_secs(3600),
            stall: Duration::from_secs(3600),
            max_total: total,
            max_per_peer: per_peer,
        }
    }

    #[tokio::test]
    async fn a_new_connection_takes_the_place_of_the_oldest_idle_one() {
        let t = Tracker::new(limits(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = t.admit(Some(a)).unwrap();
        let a2 = t.admit(Some(a)).unwrap();
        // Per peer: a's third evicts a's oldest idle.
        let _busy = a2.slot.begin();
        let a3 = t.admit(Some(a)).unwrap();
        assert!(a1.slot.killed.load(Ordering::SeqCst));
        assert!(!a2.slot.killed.load(Ordering::SeqCst));
        // Both of a's busy: a fourth from a is refused.
        let _busy3 = a3.slot.begin();
        assert!(t.admit(Some(a)).is_none());
        // In all: b gets the third place; then a fourth has no idle to evict.
        let b1 = t.admit(Some(b)).unwrap();
        assert_eq!(t.open(), 3);
        let _busy_b = b1.slot.begin();
        assert!(t.admit(Some(b)).is_none());
        assert_eq!(t.stats.refused.load(Ordering::Relaxed), 2);
        // A request that ends makes its connection evictable again.
        drop(_busy_b);
        let b2 = t.admit(Some(b)).unwrap();
        assert!(b1.slot.killed.load(Ordering::SeqCst));
        drop(b2);
        assert_eq!(t.open(), 2);
    }

    #[tokio::test]
    async fn idle_and_stalled_connections_are_closed() {
        let t = Tracker::new(Limits {
            idle: Duration::from_millis(200),
            stall: Duration::from_millis(400),
            max_total: 10,
            max_per_peer: 10,
        });
        let idle = t.admit(None).unwrap();
        let busy = t.admit(None).unwrap();
        let req = busy.slot.begin();
        let slow = t.admit(None).unwrap();
        let slow_req = slow.slot.begin();
        tokio::time::timeout(Duration::from_secs(5), idle.slot.killed())
            .await
            .expect("the idle connection is closed");
        assert!(!busy.slot.killed.load(Ordering::SeqCst));
        // A request whose body does not come is closed after the idle
        // bound, not the stall bound.
        slow.slot.waits_on_client(true);
        tokio::time::timeout(Duration::from_millis(380), slow.slot.killed())
            .await
            .expect("the request waiting on its client is closed");
        tokio::time::timeout(Duration::from_secs(5), busy.slot.killed())
            .await
            .expect("the stalled connection is closed");
        drop((req, slow_req));
    }

    #[test]
    fn an_ipv6_peer_is_its_64() {
        let a: IpAddr = "2620:0:861:1::10".parse().unwrap();
        let b: IpAddr = "2620:0:861:1:ffff::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key("2620:0:861:2::10".parse().unwrap()));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(peer_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn caps_fit_the_open_files_limit() {
        let l = Limits::default().within_fd_limit(1024);
        assert_eq!(l.max_total, 576);
        assert!(l.max_per_peer <= 576);
        assert_eq!(Limits::default().within_fd_limit(1 << 20).max_total, 8192);
    }
}
