//! The progress bar: an indicatif bar when stderr is a terminal, nothing
//! otherwise (logs stay clean; commands print their own summary lines).

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

use crate::progress::Meter;

#[derive(Default)]
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Meter for Bar {
    fn start(&self, total: u64, what: &str) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        *self.bar.lock().expect("not poisoned") = Some(bar);
    }

    fn inc(&self, n: u64) {
        if let Some(b) = &*self.bar.lock().expect("not poisoned") {
            b.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().expect("not poisoned").take() {
            b.finish_and_clear();
        }
    }
}
