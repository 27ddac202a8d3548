//! Small, dependency-free SVG charts: horizontal grouped bars with a title,
//! a legend, gridlines, an axis with its unit, and the value on every bar.
//! Horizontal bars keep long mode names and values readable without
//! rotating text.

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

    // Legend rows.
    let mut legend = Vec::new();
    let (mut x, mut row) = (LABEL, 0usize);
    for (name, colour) in c.series {
        let w = 26.0 + 6.6 * name.chars().count() as f64;
        if x + w > W - 10.0 && x > LABEL {
            x = LABEL;
            row += 1;
        }
        legend.push((x, row, *name, *colour));
        x += w + 12.0;
    }
    let legend_y = if c.subtitle.is_empty() { 46.0 } else { 62.0 };
    let top = legend_y + 18.0 * (row as f64 + 1.0) + 8.0;
    let group_h = n * (BAR + BAR_GAP) - BAR_GAP;
    let plot_h = c.groups.len() as f64 * (group_h + GROUP_GAP);
    let height = top + plot_h + 46.0;
    let plot_w = W - LABEL - RIGHT;
    let xs = |v: f64| LABEL + plot_w * (v / axis_max).clamp(0.0, 1.0);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height:.0}" viewBox="0 0 {W} {height:.0}" font-family="DejaVu Sans, Verdana, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="16" y="26" font-size="17" font-weight="bold" fill="#222">{}</text>"##,
        esc(c.title)
    );
    if !c.subtitle.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="16" y="46" font-size="12" fill="#555">{}</text>"##,
            esc(c.subtitle)
        );
    }
    for (x, row, name, colour) in &legend {
        let y = legend_y + 18.0 * *row as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{x:.1}" y="{:.1}" width="14" height="14" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="12" fill="#222">{}</text>"##,
            y - 11.0,
            x + 19.0,
            y,
            esc(name)
        );
    }
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
}
