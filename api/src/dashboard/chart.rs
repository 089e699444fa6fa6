//! The overview's charts: inline SVG drawn on the server from the stats history, so the page
//! needs no chart library and shows them without script. The SVG stretches to its box, so it
//! holds no text: the page writes the scale beside it ([`highest`]).

use std::fmt::Write;

use conveyor_analytics::query::Point;

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 140.0;

/// The largest value of a series, for the caption's scale.
pub fn highest(points: &[Point], value: impl Fn(&Point) -> Option<f64>) -> f64 {
    points.iter().filter_map(value).fold(0.0, f64::max)
}

/// Finished jobs per window (completed), as bars.
pub fn throughput(points: &[Point]) -> String {
    bars(
        points,
        |p| p.completed as f64,
        "bar-completed",
        "Jobs completed per window over the last hour",
    )
}

/// Dead jobs per window, as bars.
pub fn failures(points: &[Point]) -> String {
    bars(
        points,
        |p| p.dead as f64,
        "bar-dead",
        "Jobs that went dead per window over the last hour",
    )
}

/// The 95th-percentile run time per window, as a line.
pub fn latency(points: &[Point]) -> String {
    let values: Vec<Option<f64>> = points.iter().map(|p| p.run_p95_ms).collect();
    let max = values.iter().flatten().copied().fold(0.0, f64::max);
    let mut svg = open(
        "95th-percentile run time per window over the last hour (ms)",
        max,
    );
    if max > 0.0 && !values.is_empty() {
        let step = WIDTH / values.len().max(1) as f64;
        let mut path = String::new();
        let mut pen_down = false;
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) => {
                    let x = step * (i as f64 + 0.5);
                    let y = HEIGHT - v / max * (HEIGHT - 10.0);
                    let _ = write!(path, "{}{x:.1},{y:.1} ", if pen_down { "L" } else { "M" });
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        let _ = write!(
            svg,
            r#"<path class="line-latency" d="{}"/>"#,
            path.trim_end()
        );
    }
    svg.push_str("</svg>");
    svg
}

fn open(title: &str, max: f64) -> String {
    // `title` is one of this module's constants: no escaping needed.
    format!(
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {h}" role="img" aria-label="{title}; highest {max:.0}" preserveAspectRatio="none"><title>{title}</title><line class="axis" x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}"/>"#,
        h = HEIGHT + 1.0
    )
}

fn bars(points: &[Point], value: impl Fn(&Point) -> f64, class: &str, title: &str) -> String {
    let max = points.iter().map(&value).fold(0.0, f64::max);
    let mut svg = open(title, max);
    if max > 0.0 {
        let step = WIDTH / points.len().max(1) as f64;
        for (i, p) in points.iter().enumerate() {
            let v = value(p);
            if v <= 0.0 {
                continue;
            }
            let h = v / max * (HEIGHT - 16.0);
            let _ = write!(
                svg,
                r#"<rect class="{class}" x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}"/>"#,
                step * i as f64 + step * 0.1,
                HEIGHT - h,
                step * 0.8
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_per_window_with_jobs_scaled_to_the_highest() {
        let points: Vec<Point> = [0u64, 5, 10]
            .into_iter()
            .map(|n| Point {
                completed: n,
                ..Point::default()
            })
            .collect();
        let svg = throughput(&points);
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(
            svg.contains(r#"height="124.0""#),
            "the highest fills the chart: {svg}"
        );
        assert!(svg.contains("highest 10"));
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn no_history_draws_an_empty_chart() {
        let svg = latency(&[]);
        assert!(!svg.contains("<path"));
        assert!(svg.contains("role=\"img\""));
    }
}
