//! Progress bars with throughput (drawn only on a terminal) and one summary line per phase.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

pub struct Phase {
    bar: ProgressBar,
    what: &'static str,
    start: Instant,
}

impl Phase {
    pub fn new(len: usize, what: &'static str) -> Self {
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {pos}/{len} {per_sec} elapsed {elapsed} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what);
        Phase {
            bar,
            what,
            start: Instant::now(),
        }
    }

    /// Callback for library loops: advance by `n` items.
    pub fn tick(&self) -> impl Fn(usize) + Sync + '_ {
        move |n| self.bar.inc(n as u64)
    }

    /// Clears the bar and prints `<what> N items in T s (R items/s)` to stderr.
    pub fn finish(self, unit: &str) -> f64 {
        self.bar.finish_and_clear();
        let secs = self.start.elapsed().as_secs_f64();
        let n = self.bar.position();
        eprintln!(
            "{} {n} {unit} in {secs:.1} s ({:.1} {unit}/s)",
            self.what,
            n as f64 / secs.max(1e-9)
        );
        secs
    }
}
