//! PNG plots for experiment reports: line charts (loss curves, one series per method) and
//! overlaid, density-normalised histograms (score distributions of groups of very different
//! sizes). Text is drawn with the DejaVu Sans font embedded in the binary, so plotting needs no
//! system fonts. Files are written atomically: a reader never sees a half-written PNG.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use plotters::coord::{types::RangedCoordf64, Shift};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};

/// One named curve.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const SIZE: (u32, u32) = (900, 560);
/// More bins than pixel columns cannot be seen, and a bound keeps a typo from allocating gigabytes.
const MAX_BINS: usize = SIZE.0 as usize;
const FONT: &str = "sans-serif";
/// Matplotlib's "tab10": familiar, distinct hues that read well on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

type Root<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
/// plotters does not re-export the bitmap backend's error type, so name it through the trait.
type DrawResult = std::result::Result<
    (),
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
>;

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A line chart of several series, legend included, axes labelled, ranges from the data (with a
/// small margin); non-finite points are skipped.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let bad = |what: &str| Error::InvalidArgument(format!("{}: {what}", path.display()));
    if series.is_empty() {
        return Err(bad("line chart with no series"));
    }
    let finite = || {
        series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (x, y) = (bounds(finite().map(|p| p.0)), bounds(finite().map(|p| p.1)));
    let (Some(x), Some(y)) = (x, y) else {
        return Err(bad("line chart with no finite point in any series"));
    };
    let (Some(x), Some(y)) = (padded(x), padded(y)) else {
        return Err(bad("line chart values span more than an f64 can hold"));
    };
    write_png(path, |root| {
        draw_lines(root, title, x_label, y_label, series, x, y)
    })
}

/// Overlaid histograms of several groups over the common `range` with `bins` equal bins. Each
/// group is normalised to the share of its finite values per bin, so groups of very different
/// sizes compare; values outside `range` count in the group size but fall in no bin. The legend
/// gives each group's size ("planted FN (n=123)").
pub fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    groups: &[(String, Vec<f64>)],
    bins: usize,
    range: (f64, f64),
) -> Result<()> {
    let bad = |what: String| Error::InvalidArgument(format!("{}: {what}", path.display()));
    if groups.is_empty() {
        return Err(bad("histogram with no groups".into()));
    }
    if bins == 0 || bins > MAX_BINS {
        return Err(bad(format!(
            "histogram bins = {bins}, expected 1..={MAX_BINS}"
        )));
    }
    let (lo, hi) = range;
    // `hi - lo` must be finite too: plotters' tick search never ends on an infinite span.
    if !(lo.is_finite() && hi.is_finite() && lo < hi && (hi - lo).is_finite()) {
        return Err(bad(format!(
            "histogram range {lo}..{hi} is not a finite, non-empty interval"
        )));
    }
    let shares: Vec<(usize, Vec<f64>)> = groups
        .iter()
        .map(|(_, values)| densities(values, bins, range))
        .collect();
    if shares.iter().all(|(n, _)| *n == 0) {
        return Err(bad("histogram with no finite value in any group".into()));
    }
    write_png(path, |root| {
        draw_histogram(root, title, x_label, groups, &shares, (lo, hi))
    })
}

/// The number of finite values and the share of them in each of `bins` equal bins over `lo..=hi`.
fn densities(values: &[f64], bins: usize, (lo, hi): (f64, f64)) -> (usize, Vec<f64>) {
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    let mut n = 0;
    for &v in values.iter().filter(|v| v.is_finite()) {
        n += 1;
        if (lo..=hi).contains(&v) {
            // `hi` itself belongs to the last bin, as in numpy.
            counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
        }
    }
    let shares = counts.iter().map(|&c| c as f64 / n.max(1) as f64);
    (n, shares.collect())
}

/// Smallest and largest of the values, `None` when there are none.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Widens a data range by 5% each side. A (nearly) flat range gets a ±10% band around its value
/// instead, so a constant series shows as a line mid-plot and the tick search stays well-defined.
/// `None` when even the unpadded span overflows.
fn padded((lo, hi): (f64, f64)) -> Option<(f64, f64)> {
    let magnitude = lo.abs().max(hi.abs());
    // Below 1e-100 the values are as good as zero; sizing the band from them would reach subnormals.
    let unit = if magnitude > 1e-100 { magnitude } else { 1.0 };
    let span = hi - lo;
    let pad = if span > 1e-9 * unit {
        0.05 * span
    } else {
        0.1 * unit
    };
    let (a, b) = (lo - pad, hi + pad);
    if (b - a).is_finite() {
        Some((a, b))
    } else if span.is_finite() {
        Some((lo, hi))
    } else {
        None
    }
}

/// Registers the embedded font once per process; plotters looks fonts up by family name.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| Error::InvalidArgument("the embedded DejaVu font failed to load".into()))
}

/// Renders into a temporary file beside `path` and renames it over `path`, creating the folder.
fn write_png(path: &Path, draw: impl FnOnce(Root) -> DrawResult) -> Result<()> {
    register_font()?;
    let Some(name) = path.file_name() else {
        return Err(Error::InvalidArgument(format!(
            "{}: plot path has no file name",
            path.display()
        )));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Unique per process and call; the `.png` suffix tells the encoder the format.
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let tmp: PathBuf = dir.join(format!(
        ".{}.{}-{}.tmp.png",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    // The backend (and so any partial save on drop) is gone once `draw` returns.
    let drawn = draw(BitMapBackend::new(&tmp, SIZE).into_drawing_area());
    let result = match drawn {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
        Err(e) => Err(Error::io(
            path,
            std::io::Error::other(format!("drawing the plot failed: {e}")),
        )),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn draw_lines(
    root: Root,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> DrawResult {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(BLACK.mix(0.04))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        // A lone point draws no line segment; a dot keeps it visible.
        let dot = if points.len() == 1 { 3 } else { 0 };
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)).point_size(dot))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    draw_legend(&mut chart)?;
    root.present()
}

fn draw_histogram(
    root: Root,
    title: &str,
    x_label: &str,
    groups: &[(String, Vec<f64>)],
    shares: &[(usize, Vec<f64>)],
    (lo, hi): (f64, f64),
) -> DrawResult {
    let top = shares
        .iter()
        .flat_map(|(_, s)| s)
        .fold(0.0f64, |m, &s| m.max(s));
    let top = if top > 0.0 { 1.1 * top } else { 1.0 };
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(lo..hi, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("share of group per bin")
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(BLACK.mix(0.04))
        .draw()?;
    for (i, ((name, _), (n, share))) in groups.iter().zip(shares).enumerate() {
        let c = colour(i);
        let edge = |b: usize| lo + (hi - lo) * b as f64 / share.len() as f64;
        // Semi-transparent bars show overlaps; the solid step outline keeps each group readable.
        chart.draw_series(
            share
                .iter()
                .enumerate()
                .filter(|(_, &s)| s > 0.0)
                .map(|(b, &s)| {
                    Rectangle::new([(edge(b), 0.0), (edge(b + 1), s)], c.mix(0.3).filled())
                }),
        )?;
        let mut step = vec![(lo, 0.0)];
        for (b, &s) in share.iter().enumerate() {
            step.extend([(edge(b), s), (edge(b + 1), s)]);
        }
        step.push((hi, 0.0));
        chart
            .draw_series(LineSeries::new(step, c.stroke_width(2)))?
            .label(format!("{name} (n={n})"))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.mix(0.5).filled())
            });
    }
    draw_legend(&mut chart)?;
    root.present()
}

fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .label_font((FONT, 14))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "not a PNG: {}",
            path.display()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    /// Pixels of clearly chromatic colour: series and bars, never the black/grey axes and text.
    fn coloured_pixels(draw: impl FnOnce(Root) -> DrawResult) -> usize {
        register_font().unwrap();
        let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        draw(BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area()).unwrap();
        buf.chunks(3)
            .filter(|p| {
                let (max, min) = (p.iter().max().unwrap(), p.iter().min().unwrap());
                max - min > 30
            })
            .count()
    }

    fn loss(name: &str, scale: f64) -> Series {
        let points = (0..200)
            .map(|i| (i as f64, scale / (1.0 + i as f64)))
            .collect();
        Series {
            name: name.into(),
            points,
        }
    }

    #[test]
    fn line_chart_writes_png_of_the_right_size_into_a_new_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/sub/loss.png");
        let series = [loss("rrra", 1.0), loss("baseline", 2.0)];
        line_chart(&path, "Training loss", "step", "loss", &series).unwrap();
        assert_eq!(png_size(&path), SIZE);
        // Overwrites in place and leaves no temporary file behind.
        line_chart(&path, "Training loss", "step", "loss", &series[..1]).unwrap();
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn line_chart_draws_the_curves_and_survives_odd_data() {
        let bounds = |s: &[Series]| {
            let pts = || {
                s.iter()
                    .flat_map(|s| &s.points)
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
            };
            let x = padded(bounds(pts().map(|p| p.0)).unwrap()).unwrap();
            (x, padded(bounds(pts().map(|p| p.1)).unwrap()).unwrap())
        };
        let mut odd = loss("nan and inf", 1.0);
        odd.points[3].1 = f64::NAN;
        odd.points[7].0 = f64::INFINITY;
        let constant = Series {
            name: "flat".into(),
            points: vec![(0.0, 0.5), (10.0, 0.5)],
        };
        let lone = Series {
            name: "one point".into(),
            points: vec![(1.0, 1.0)],
        };
        for s in [vec![odd], vec![constant], vec![lone]] {
            let (x, y) = bounds(&s);
            let n = coloured_pixels(|root| draw_lines(root, "t", "x", "y", &s, x, y));
            assert!(n > 20, "{}: only {n} coloured pixels", s[0].name);
        }
        let tmp = tempfile::tempdir().unwrap();
        let huge = Series {
            name: "huge".into(),
            points: vec![(0.0, -1e308), (1.0, 1e308)],
        };
        let flat_huge = Series {
            name: "flat huge".into(),
            points: vec![(0.0, 1.7e308), (1.0, 1.7e308)],
        };
        assert!(line_chart(&tmp.path().join("h.png"), "t", "x", "y", &[huge]).is_err());
        line_chart(&tmp.path().join("f.png"), "t", "x", "y", &[flat_huge]).unwrap();
    }

    #[test]
    fn histogram_writes_normalised_overlaid_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.png");
        let few: Vec<f64> = (0..123).map(|i| 0.5 + 0.4 * (i as f64 / 123.0)).collect();
        let many: Vec<f64> = (0..20_000).map(|i| 0.6 * (i as f64 / 20_000.0)).collect();
        let groups = [
            ("planted FN".to_string(), few),
            (
                "true negatives".to_string(),
                many.into_iter().chain([f64::NAN, 9.0]).collect(),
            ),
        ];
        histogram(
            &path,
            "False-negative scores",
            "score",
            &groups,
            40,
            (0.0, 1.0),
        )
        .unwrap();
        assert_eq!(png_size(&path), SIZE);
        let shares: Vec<_> = groups
            .iter()
            .map(|(_, v)| densities(v, 40, (0.0, 1.0)))
            .collect();
        let n =
            coloured_pixels(|root| draw_histogram(root, "t", "x", &groups, &shares, (0.0, 1.0)));
        assert!(n > 10_000, "only {n} coloured pixels");
    }

    #[test]
    fn densities_are_shares_of_the_finite_values() {
        let values = [0.0, 0.1, 0.5, 0.99, 1.0, 1.5, -3.0, f64::NAN, f64::INFINITY];
        let (n, shares) = densities(&values, 4, (0.0, 1.0));
        assert_eq!(n, 7, "NaN and inf are not counted");
        // 0.0 and 0.1 in the first bin, 0.5 in the third, 0.99 and the upper edge in the last;
        // 1.5 and -3.0 lie outside the range and fall in no bin.
        let expected = [2.0 / 7.0, 0.0, 1.0 / 7.0, 2.0 / 7.0];
        assert!(
            shares
                .iter()
                .zip(expected)
                .all(|(a, b)| (a - b).abs() < 1e-12),
            "{shares:?}"
        );
        assert_eq!(densities(&[], 3, (0.0, 1.0)), (0, vec![0.0; 3]));
    }

    #[test]
    fn bad_inputs_are_rejected_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let empty = Series {
            name: "e".into(),
            points: vec![],
        };
        let nan = Series {
            name: "n".into(),
            points: vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
        };
        let invalid = |r: Result<()>| matches!(r, Err(Error::InvalidArgument(_)));
        assert!(invalid(line_chart(&path, "t", "x", "y", &[])));
        assert!(invalid(line_chart(&path, "t", "x", "y", &[empty])));
        assert!(invalid(line_chart(&path, "t", "x", "y", &[nan])));
        let g = vec![("g".to_string(), vec![0.1, 0.2])];
        assert!(invalid(histogram(&path, "t", "x", &[], 10, (0.0, 1.0))));
        assert!(invalid(histogram(&path, "t", "x", &g, 0, (0.0, 1.0))));
        assert!(invalid(histogram(&path, "t", "x", &g, 1 << 40, (0.0, 1.0))));
        for range in [
            (1.0, 1.0),
            (1.0, 0.0),
            (0.0, f64::NAN),
            (-f64::MAX, f64::MAX),
        ] {
            assert!(
                invalid(histogram(&path, "t", "x", &g, 10, range)),
                "{range:?}"
            );
        }
        let nans = vec![("g".to_string(), vec![f64::NAN])];
        assert!(invalid(histogram(&path, "t", "x", &nans, 10, (0.0, 1.0))));
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
