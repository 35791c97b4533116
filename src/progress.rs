//! How long work reports how far it has come. The library calls a
//! [`Meter`]; what it draws (a bar on a terminal, nothing in a log) is the
//! command line's business (`cli::bar`).

/// Told about one long phase at a time.
pub trait Meter: Sync {
    /// A phase of `total` steps starts.
    fn start(&self, total: u64, what: &str);
    fn inc(&self, n: u64);
    fn finish(&self);
}

/// Shows nothing.
pub struct Silent;

impl Meter for Silent {
    fn start(&self, _: u64, _: &str) {}
    fn inc(&self, _: u64) {}
    fn finish(&self) {}
}
