//! Figures: quantiles, CDFs and plain SVG line charts.

use std::fmt::Write as _;

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of figures taken from rounds.
pub fn median_of(values: impl IntoIterator<Item = f64>) -> f64 {
    median(&mut values.into_iter().collect::<Vec<_>>())
}

pub fn quantiles(samples: &[f64]) -> [f64; 4] {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return [f64::NAN; 4];
    }
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.95), at(0.99), s[s.len() - 1]]
}

pub fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len().max(1) as f64;
    let step = (s.len() / 400).max(1);
    s.iter().enumerate().step_by(step).map(|(i, v)| (*v, (i + 1) as f64 / n)).collect()
}

/// A plain SVG line chart (log-scaled x for latency CDFs).
pub fn svg_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> String {
    let (w, h, m) = (760.0, 420.0, 60.0);
    let tx = |x: f64| if log_x { x.max(0.01).log10() } else { x };
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().map(|(x, y)| (tx(*x), *y))).collect();
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let (y0, y1) = (0.0, pts.iter().fold(0.0f64, |a, (_, y)| a.max(*y)).max(1e-9));
    let (x1, x0) = if x1 > x0 { (x1, x0) } else { (x0 + 1.0, x0) };
    let sx = |x: f64| m + (tx(x) - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/><text x='{}' y='24' text-anchor='middle' font-size='15'>{title}</text>\
         <line x1='{m}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{m}' y1='{m}' x2='{m}' y2='{}' stroke='black'/>\
         <text x='{}' y='{}' text-anchor='middle'>{x_label}{}</text><text x='16' y='{}' transform='rotate(-90 16 {})' text-anchor='middle'>{y_label}</text>",
        w / 2.0, h - m, w - m, h - m, h - m, w / 2.0, h - 18.0, if log_x { " (log)" } else { "" }, h / 2.0, h / 2.0
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let label = if log_x { 10f64.powf(fx) } else { fx };
        let _ = write!(
            svg,
            "<text x='{}' y='{}' text-anchor='middle'>{label:.1}</text>",
            m + (w - 2.0 * m) * i as f64 / 4.0,
            h - m + 16.0
        );
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(svg, "<text x='{}' y='{}' text-anchor='end'>{fy:.2}</text>", m - 6.0, sy(fy) + 4.0);
    }
    for (k, (name, points)) in series.iter().enumerate() {
        let color = colors[k % colors.len()];
        let path: Vec<String> = points.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        let _ = write!(svg, "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>", path.join(" "));
        let _ = write!(svg, "<text x='{}' y='{}' fill='{color}'>{name}</text>", w - m - 220.0, m + 16.0 * k as f64);
    }
    svg.push_str("</svg>");
    svg
}
