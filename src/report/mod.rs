//! Reports of experiments: PNG plots (loss curves, score histograms).

pub mod plot;
