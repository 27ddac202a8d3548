//! Small, dependency-free SVG charts: horizontal grouped bars with a title,
//! a legend, gridlines, an axis with its unit, and the value on every bar
//! ([`hbar`]; horizontal bars keep long mode names and values readable
//! without rotating text), and values over time as lines or thin bars
//! ([`time_chart`]).

use std::fmt::Write as _;

/// One chart: `groups` of bars, one bar per series (missing values show
/// "n/a").
pub struct Chart<'a> {
    pub title: &'a str,
    pub subtitle: &'a str,
    /// The axis label, e.g. "Gbit/s (higher is better)".
    pub unit: &'a str,
    /// (name, colour) per series, in bar order.
    pub series: &'a [(&'a str, &'a str)],
    pub groups: &'a [(String, Vec<Option<f64>>)],
    pub decimals: usize,
}

const W: f64 = 880.0;
const LABEL: f64 = 200.0;
const RIGHT: f64 = 70.0;
const BAR: f64 = 15.0;
const BAR_GAP: f64 = 3.0;
const GROUP_GAP: f64 = 18.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2, 2.5 or 5 times a power of ten) for about five
/// ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-12);
    let pow = 10f64.powf(raw.log10().floor());
    let frac = raw / pow;
    let nice = if frac <= 1.0 {
        1.0
    } else if frac <= 2.0 {
        2.0
    } else if frac <= 2.5 {
        2.5
    } else if frac <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * pow
}

fn fmt_tick(v: f64) -> String {
    let v = (v * 1e6).round() / 1e6;
    if v == v.trunc() {
        format!("{v:.0}")
    } else if (v * 10.0) == (v * 10.0).trunc() {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The start of a chart `height` high: the `<svg>` element, a white
/// background, the title and the subtitle (if any).
fn open(height: f64, title: &str, subtitle: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height:.0}" viewBox="0 0 {W} {height:.0}" font-family="DejaVu Sans, Verdana, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="16" y="26" font-size="17" font-weight="bold" fill="#222">{}</text>"##,
        esc(title)
    );
    if !subtitle.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="16" y="46" font-size="12" fill="#555">{}</text>"##,
            esc(subtitle)
        );
    }
    s
}

/// A legend under the title (and subtitle): a swatch and a name per
/// series, in rows from `left` that wrap before the chart's right edge.
struct Legend<'a> {
    /// (x, row, name, colour) per series.
    items: Vec<(f64, usize, &'a str, &'a str)>,
    /// The baseline of the first row.
    y: f64,
    /// Below the last row: where the plot begins.
    bottom: f64,
}

impl<'a> Legend<'a> {
    /// Lays out (name, colour) per series.
    fn new(
        left: f64,
        subtitle: &str,
        series: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut items = Vec::new();
        let (mut x, mut row) = (left, 0usize);
        for (name, colour) in series {
            let w = 26.0 + 6.6 * name.chars().count() as f64;
            if x + w > W - 10.0 && x > left {
                x = left;
                row += 1;
            }
            items.push((x, row, name, colour));
            x += w + 12.0;
        }
        let y = if subtitle.is_empty() { 46.0 } else { 62.0 };
        let bottom = y + 18.0 * (row as f64 + 1.0) + 8.0;
        Legend { items, y, bottom }
    }

    fn draw(&self, s: &mut String) {
        for (x, row, name, colour) in &self.items {
            let y = self.y + 18.0 * *row as f64;
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{:.1}" width="14" height="14" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="12" fill="#222">{}</text>"##,
                y - 11.0,
                x + 19.0,
                y,
                esc(name)
            );
        }
    }
}

pub fn hbar(c: &Chart) -> String {
    let n = c.series.len().max(1) as f64;
    let vmax = c
        .groups
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let step = nice_step(if vmax > 0.0 { vmax } else { 1.0 });
    let axis_max = ((vmax / step).ceil() * step).max(step);

    let legend = Legend::new(LABEL, c.subtitle, c.series.iter().copied());
    let top = legend.bottom;
    let group_h = n * (BAR + BAR_GAP) - BAR_GAP;
    let plot_h = c.groups.len() as f64 * (group_h + GROUP_GAP);
    let height = top + plot_h + 46.0;
    let plot_w = W - LABEL - RIGHT;
    let xs = |v: f64| LABEL + plot_w * (v / axis_max).clamp(0.0, 1.0);

    let mut s = open(height, c.title, c.subtitle);
    legend.draw(&mut s);
    // Gridlines and ticks.
    let ticks = (axis_max / step).round() as usize;
    for k in 0..=ticks {
        let t = k as f64 * step;
        let x = xs(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e3e3e3"/><text x="{x:.1}" y="{:.1}" font-size="11" fill="#444" text-anchor="middle">{}</text>"##,
            top + plot_h,
            top + plot_h + 15.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LABEL}" y1="{top:.1}" x2="{LABEL}" y2="{:.1}" stroke="#888"/>"##,
        top + plot_h
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#222" text-anchor="middle">{}</text>"##,
        LABEL + plot_w / 2.0,
        top + plot_h + 34.0,
        esc(c.unit)
    );
    // Bars.
    for (g, (label, values)) in c.groups.iter().enumerate() {
        let gy = top + GROUP_GAP / 2.0 + g as f64 * (group_h + GROUP_GAP);
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#222" text-anchor="end" dominant-baseline="middle">{}</text>"##,
            LABEL - 8.0,
            gy + group_h / 2.0,
            esc(label)
        );
        for (i, (name, colour)) in c.series.iter().enumerate() {
            let y = gy + i as f64 * (BAR + BAR_GAP);
            match values.get(i).copied().flatten().filter(|v| v.is_finite()) {
                Some(v) => {
                    let x1 = xs(v);
                    let _ = writeln!(
                        s,
                        r##"<rect x="{LABEL}" y="{y:.1}" width="{:.1}" height="{BAR}" fill="{colour}"><title>{}: {}</title></rect><text x="{:.1}" y="{:.1}" font-size="11" fill="#222" dominant-baseline="middle">{}</text>"##,
                        (x1 - LABEL).max(0.5),
                        esc(name),
                        format_args!("{v:.*}", c.decimals),
                        x1 + 4.0,
                        y + BAR / 2.0 + 0.5,
                        format_args!("{v:.*}", c.decimals)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#999" dominant-baseline="middle">n/a</text>"##,
                        LABEL + 4.0,
                        y + BAR / 2.0 + 0.5
                    );
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// How a series is drawn on a [`TimeChart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A line through the points; a NaN y breaks it (e.g. a process
    /// restart).
    Line,
    /// A thin bar from 0 to y at each x (events: a gap's length, a count
    /// per window).
    Bars,
}

/// One series of a [`TimeChart`]: (x, y) points, x in the chart's unit.
pub struct TimeSeries<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    pub mark: Mark,
    pub points: Vec<(f64, f64)>,
}

/// A chart of values over time (or any x): lines or bars per series, with
/// a title, a legend, gridlines and both axes labelled.
pub struct TimeChart<'a> {
    pub title: &'a str,
    pub subtitle: &'a str,
    /// The x axis label, e.g. "seconds since the start".
    pub x_unit: &'a str,
    /// The y axis label, e.g. "MB".
    pub y_unit: &'a str,
    pub series: &'a [TimeSeries<'a>],
}

const TC_LEFT: f64 = 70.0;
const TC_RIGHT: f64 = 24.0;
const TC_PLOT_H: f64 = 260.0;

pub fn time_chart(c: &TimeChart) -> String {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts = || c.series.iter().flat_map(|s| s.points.iter().filter(finite));
    let xmin = pts().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let xmin = if xmin.is_finite() { xmin.min(0.0) } else { 0.0 };
    let xmax = pts().map(|p| p.0).fold(xmin, f64::max);
    let ymax = pts().map(|p| p.1).fold(0.0f64, f64::max);
    let ystep = nice_step(if ymax > 0.0 { ymax } else { 1.0 });
    let y_axis = ((ymax / ystep).ceil() * ystep).max(ystep);
    let xspan = if xmax > xmin { xmax - xmin } else { 1.0 };
    let xstep = nice_step(xspan);
    let x_axis = xmin + ((xspan / xstep).ceil() * xstep).max(xstep);

    let legend = Legend::new(
        TC_LEFT,
        c.subtitle,
        c.series.iter().map(|sr| (sr.name, sr.colour)),
    );
    let top = legend.bottom;
    let height = top + TC_PLOT_H + 46.0;
    let plot_w = W - TC_LEFT - TC_RIGHT;
    let xs = |x: f64| TC_LEFT + plot_w * ((x - xmin) / (x_axis - xmin)).clamp(0.0, 1.0);
    let ys = |y: f64| top + TC_PLOT_H * (1.0 - (y / y_axis).clamp(0.0, 1.0));

    let mut s = open(height, c.title, c.subtitle);
    legend.draw(&mut s);
    let bottom = top + TC_PLOT_H;
    for k in 0..=((y_axis / ystep).round() as usize) {
        let v = k as f64 * ystep;
        let y = ys(v);
        let _ = writeln!(
            s,
            r##"<line x1="{TC_LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" font-size="11" fill="#444" text-anchor="end" dominant-baseline="middle">{}</text>"##,
            TC_LEFT + plot_w,
            TC_LEFT - 6.0,
            y,
            fmt_tick(v)
        );
    }
    for k in 0..=(((x_axis - xmin) / xstep).round() as usize) {
        let v = xmin + k as f64 * xstep;
        let x = xs(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" font-size="11" fill="#444" text-anchor="middle">{}</text>"##,
            bottom + 15.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{TC_LEFT}" y1="{bottom:.1}" x2="{:.1}" y2="{bottom:.1}" stroke="#888"/><line x1="{TC_LEFT}" y1="{top:.1}" x2="{TC_LEFT}" y2="{bottom:.1}" stroke="#888"/>"##,
        TC_LEFT + plot_w
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="#222" text-anchor="middle">{}</text>"##,
        TC_LEFT + plot_w / 2.0,
        bottom + 34.0,
        esc(c.x_unit)
    );
    let _ = writeln!(
        s,
        r##"<text x="14" y="{:.1}" font-size="12" fill="#222" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"##,
        top + TC_PLOT_H / 2.0,
        top + TC_PLOT_H / 2.0,
        esc(c.y_unit)
    );
    for sr in c.series {
        match sr.mark {
            Mark::Line => {
                let mut d = String::new();
                let mut pen_up = true;
                for &(x, y) in &sr.points {
                    if !(x.is_finite() && y.is_finite()) {
                        pen_up = true;
                        continue;
                    }
                    let _ = write!(
                        d,
                        "{}{:.1},{:.1} ",
                        if pen_up { "M" } else { "L" },
                        xs(x),
                        ys(y)
                    );
                    pen_up = false;
                }
                if !d.is_empty() {
                    let _ = writeln!(
                        s,
                        r##"<path d="{}" fill="none" stroke="{}" stroke-width="1.5"><title>{}</title></path>"##,
                        d.trim_end(),
                        sr.colour,
                        esc(sr.name)
                    );
                }
            }
            Mark::Bars => {
                for &(x, y) in sr.points.iter().filter(|p| finite(p)) {
                    let y0 = ys(y.max(0.0));
                    let _ = writeln!(
                        s,
                        r##"<rect x="{:.1}" y="{y0:.1}" width="2" height="{:.1}" fill="{}"><title>{}: {} at {}</title></rect>"##,
                        xs(x) - 1.0,
                        (bottom - y0).max(1.0),
                        sr.colour,
                        esc(sr.name),
                        fmt_tick(y),
                        fmt_tick(x)
                    );
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(1.0), 0.2);
        assert_eq!(nice_step(12.0), 2.5);
        assert_eq!(nice_step(300_000.0), 100_000.0);
        assert_eq!(fmt_tick(0.2 + 0.2 + 0.2), "0.6");
        assert_eq!(fmt_tick(2.5), "2.5");
        assert_eq!(fmt_tick(10.0), "10");
    }

    #[test]
    fn renders_values_and_gaps() {
        let groups = vec![
            ("TCP 1 stream".to_string(), vec![Some(3.25), None]),
            ("a < b".to_string(), vec![Some(0.5), Some(1.0)]),
        ];
        let svg = hbar(&Chart {
            title: "t",
            subtitle: "s",
            unit: "Gbit/s",
            series: &[("x", "#000"), ("y", "#111")],
            groups: &groups,
            decimals: 2,
        });
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains(">3.25</text>"));
        assert!(svg.contains(">n/a</text>"));
        assert!(svg.contains("a &lt; b"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn time_charts_draw_lines_with_breaks_and_bars() {
        let series = [
            TimeSeries {
                name: "rss h0",
                colour: "#123",
                mark: Mark::Line,
                points: vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN), (3.0, 2.5)],
            },
            TimeSeries {
                name: "gaps <netd>",
                colour: "#456",
                mark: Mark::Bars,
                points: vec![(1.5, 0.2)],
            },
        ];
        let svg = time_chart(&TimeChart {
            title: "t",
            subtitle: "",
            x_unit: "s",
            y_unit: "MB",
            series: &series,
        });
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Two pen-downs: the NaN breaks the line.
        let path = svg
            .lines()
            .find(|l| l.starts_with("<path"))
            .expect("a line");
        assert_eq!(path.matches('M').count(), 2, "{path}");
        assert!(svg.contains("gaps &lt;netd&gt;: 0.2 at 1.5"));
        // Nothing to draw is still a chart.
        let empty = time_chart(&TimeChart {
            title: "e",
            subtitle: "s",
            x_unit: "s",
            y_unit: "n",
            series: &[],
        });
        assert!(empty.contains("</svg>"));
    }
}
