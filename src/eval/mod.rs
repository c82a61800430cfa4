//! Evaluation of runs against relevance judgements, with trec_eval semantics so that numbers
//! are comparable with published BEIR / pytrec_eval results.

pub mod fn_detection;
pub mod metrics;

pub use metrics::{evaluate, EvalOptions, Evaluation};
