//! The experiment's outputs: `results.json`, `results.md` and the plots, rewritten after each
//! trial so a long run can be read while it goes.

use super::{ExperimentConfig, Trial};
use crate::error::{Error, Result};
use crate::report::plot::{histogram, line_chart, Series};
use std::fmt::Write as _;

/// The retrieval columns of the table: (metric key, header).
const COLUMNS: [(&str, &str); 5] = [
    ("ndcg@10", "nDCG@10"),
    ("mrr@10", "MRR@10"),
    ("recall@1", "R@1"),
    ("recall@10", "R@10"),
    ("recall@100", "R@100"),
];

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, 0.0);
    }
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, s)
}

fn cell(v: &[f64]) -> String {
    let (m, s) = mean_std(v);
    if v.len() > 1 {
        format!("{m:.4} ± {s:.4}")
    } else {
        format!("{m:.4}")
    }
}

/// The markdown report.
pub fn markdown(
    cfg: &ExperimentConfig,
    data: &serde_json::Value,
    trials: &[Trial],
    wall_s: f64,
) -> String {
    let mut md = String::new();
    let seeds: Vec<String> = cfg.seeds.iter().map(|s| s.to_string()).collect();
    let _ = writeln!(md, "# RRRA comparison on {}\n", cfg.data.display());
    let _ = writeln!(
        md,
        "Encoder {} · seeds {} · {} fit / {} dev / {} test queries · {} planted false negatives in {} queries · \
         fine-tuning: {} epoch(s){}, batch {}, lr {}, {} hard + {} random negatives, documents ≤ {} tokens · \
         evaluation: top-{} at ≤ {} tokens · wall time {:.0} s\n",
        cfg.model.display(),
        seeds.join(", "),
        data["fit_queries"],
        data["dev_queries"],
        data["test_queries"],
        data["planted"],
        data["queries_with_planted"],
        cfg.epochs,
        cfg.max_steps.map(|m| format!(" (at most {m} steps)")).unwrap_or_default(),
        cfg.batch_size,
        cfg.lr,
        cfg.hard_negatives,
        cfg.random_negatives,
        cfg.doc_max_length,
        cfg.assess.rerank_k,
        cfg.assess.max_length,
        wall_s
    );
    let _ = write!(md, "| method |");
    for (_, h) in COLUMNS {
        let _ = write!(md, " {h} |");
    }
    let _ = writeln!(md, " FN AUC (s_FN) | lambda_rr | n |");
    let _ = writeln!(md, "|---|{}---|---|---|", "---|".repeat(COLUMNS.len()));
    for &m in &cfg.methods {
        let ts: Vec<&Trial> = trials.iter().filter(|t| t.method == m).collect();
        if ts.is_empty() {
            continue;
        }
        let (plain, reranked) = m.labels();
        for (label, rr) in [(plain, false), (reranked, true)] {
            let _ = write!(md, "| {label} |");
            for (key, _) in COLUMNS {
                let v: Vec<f64> = ts
                    .iter()
                    .map(|t| {
                        let map = if rr {
                            &t.assessment.test_reranked
                        } else {
                            &t.assessment.test
                        };
                        map.get(key).copied().unwrap_or(f64::NAN)
                    })
                    .collect();
                let _ = write!(md, " {} |", cell(&v));
            }
            let auc: Vec<f64> = ts
                .iter()
                .filter_map(|t| t.assessment.detection.get("s_fn").map(|d| d.auc_per_query))
                .collect();
            let lam: Vec<f64> = ts.iter().map(|t| t.assessment.lambda_rr).collect();
            let lam = if rr { cell(&lam) } else { "–".into() };
            let _ = writeln!(md, " {} | {lam} | {} |", cell(&auc), ts.len());
        }
    }
    let _ = writeln!(
        md,
        "\nFN AUC: per-query ROC-AUC of the calibrated false-negative score s_FN for the planted \
         false negatives among the mined top-{} of the fit queries, with the adapter trained on \
         that row's frozen encoder.\n",
        cfg.assess.mine_top_k
    );
    let _ = writeln!(
        md,
        "## Planted false-negative detection (per-query ROC-AUC / pooled ROC-AUC / precision@n)\n"
    );
    let mut scorers: Vec<String> = trials
        .iter()
        .flat_map(|t| t.assessment.detection.keys().cloned())
        .collect();
    scorers.sort();
    scorers.dedup();
    let _ = writeln!(md, "| encoder | {} |", scorers.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(scorers.len()));
    for &m in &cfg.methods {
        let ts: Vec<&Trial> = trials.iter().filter(|t| t.method == m).collect();
        if ts.is_empty() {
            continue;
        }
        let _ = write!(md, "| {} |", m.labels().0);
        for s in &scorers {
            let get = |f: fn(&crate::eval::fn_detection::Detection) -> f64| -> Vec<f64> {
                ts.iter()
                    .filter_map(|t| t.assessment.detection.get(s).map(f))
                    .collect()
            };
            let (a, _) = mean_std(&get(|d| d.auc_per_query));
            let (p, _) = mean_std(&get(|d| d.auc_pooled));
            let (pr, _) = mean_std(&get(|d| d.precision_at_n));
            let _ = write!(md, " {a:.3} / {p:.3} / {pr:.3} |");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\nScorers: `s_fn` = sigmoid(w_s·s + w_p·logit p + w_0) fitted on the training pairs; \
         `adapter_p` = the adapter's p alone; `retriever` = the raw similarity (the rank); \
         `simans` = SimANS's weight with the best visible positive (a = {}); \
         `score_plus_log_p` = s/tau + log p (the prototype's fixed combination); `_cross_fit` = \
         {}-fold cross-fitted adapters; `_positive_aware` = an adapter that also reads the mean \
         of the query's labelled positives.\n",
        cfg.assess.simans_a, cfg.assess.adapter.cross_fit_folds
    );
    let _ = writeln!(md, "## Wall time per stage (seconds, mean over seeds)\n");
    let _ = writeln!(md, "| encoder | fine-tune | encode | adapter | rerank |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for &m in &cfg.methods {
        let ts: Vec<&Trial> = trials.iter().filter(|t| t.method == m).collect();
        if ts.is_empty() {
            continue;
        }
        let sec = |k: &str| {
            mean_std(
                &ts.iter()
                    .map(|t| t.assessment.seconds.get(k).copied().unwrap_or(0.0))
                    .collect::<Vec<_>>(),
            )
            .0
        };
        let train = mean_std(&ts.iter().map(|t| t.train_s).collect::<Vec<_>>()).0;
        let _ = writeln!(
            md,
            "| {} | {train:.0} | {:.0} | {:.0} | {:.0} |",
            m.labels().0,
            sec("encode"),
            sec("adapter"),
            sec("rerank")
        );
    }
    md
}

/// Writes `results.json`, `results.md` and the plots into `cfg.out`.
pub fn write(
    cfg: &ExperimentConfig,
    data: &serde_json::Value,
    trials: &[Trial],
    wall_s: f64,
) -> Result<()> {
    let json = serde_json::json!({
        "config": cfg, "data": data, "wall_s": wall_s, "trials": trials,
    });
    let put = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = cfg.out.join(name);
        crate::util::atomic_write(&path, |w| {
            std::io::Write::write_all(w, bytes).map_err(|e| Error::io(&path, e))
        })
    };
    put(
        "results.json",
        serde_json::to_string_pretty(&json)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    put("results.md", markdown(cfg, data, trials, wall_s).as_bytes())?;
    let plots = cfg.out.join("plots");
    let first = cfg.seeds[0];
    let series: Vec<Series> = trials
        .iter()
        .filter(|t| t.seed == first && !t.losses.is_empty())
        .map(|t| Series {
            name: t.method.name().into(),
            points: t.losses.iter().map(|&(s, l)| (s as f64, l)).collect(),
        })
        .collect();
    if !series.is_empty() {
        line_chart(
            &plots.join("loss.png"),
            &format!("InfoNCE loss, seed {first}"),
            "step",
            "loss",
            &series,
        )?;
    }
    for t in trials.iter().filter(|t| t.seed == first) {
        let a = &t.assessment;
        if a.s_fn_planted.is_empty() || a.s_fn_others.is_empty() {
            continue;
        }
        histogram(
            &plots.join(format!("s_fn_{}.png", t.method.name())),
            &format!(
                "s_FN on the mined pools, {} encoder, seed {first}",
                t.method.name()
            ),
            "s_FN",
            &[
                ("planted false negatives".into(), a.s_fn_planted.clone()),
                ("other candidates".into(), a.s_fn_others.clone()),
            ],
            40,
            (0.0, 1.0),
        )?;
    }
    Ok(())
}
