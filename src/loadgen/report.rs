//! What a run measured ([`LoadResult`], also the `--json` file), the summary printed at the end,
//! and the `--report` HTML page (inline SVG, no scripts, no external files).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// One second of the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    /// Seconds since the window started.
    pub second: u64,
    /// Requests due (open loop) or sent (closed loop) in it that were answered.
    pub requests: u64,
    /// Their latency.
    pub latency_ms: Percentiles,
}

/// One minute of the measured window (its seconds' latencies together: percentiles of a
/// minute cannot be had from those of its seconds).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Minute {
    /// Minutes since the window started.
    pub minute: u64,
    /// Requests due (open loop) or sent (closed loop) in it that were answered.
    pub requests: u64,
    /// Their latency.
    pub latency_ms: Percentiles,
}

/// A point of the latency distribution: this percentile is at most this many ms.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DistributionPoint {
    /// Percentile, 0–100.
    pub percentile: f64,
    /// Latency at it, ms.
    pub latency_ms: f64,
}

/// The outcome of one run (`--json` writes it as is).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadResult {
    /// Server base URL.
    pub url: String,
    /// `open` (a target rate) or `closed` (`--rate max`).
    pub mode: &'static str,
    /// The target rate, requests/s (open loop).
    pub target_rate: Option<f64>,
    /// Connections.
    pub connections: usize,
    /// Pings per request.
    pub batch: usize,
    /// `admin` or `client` (a JWT per user).
    pub auth: &'static str,
    /// Users the pings came from (at any one time, with churn).
    pub users: usize,
    /// Users replaced per second (`--user-churn-per-s`).
    pub user_churn_per_s: f64,
    /// Users replaced over the run (warm-up included).
    pub users_churned: u64,
    /// Warm-up, seconds (sent, not recorded).
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// From the window's start to the last measured answer, seconds (longer than `duration_s`
    /// when the server fell behind an open-loop schedule).
    pub elapsed_s: f64,
    /// Measured requests answered (any status).
    pub requests: u64,
    /// Of them, answered `200`.
    pub ok: u64,
    /// Pings in the measured requests answered `200`.
    pub pings: u64,
    /// Of those, the server's `accepted` (valid pings).
    pub accepted: u64,
    /// Of those, `ignored` by the trigger rules.
    pub ignored: u64,
    /// Coupons issued (events in the answers).
    pub events: u64,
    /// Measured requests that failed: by status code, or `transport` (connection errors).
    pub errors: BTreeMap<String, u64>,
    /// Measured requests answered per second of `elapsed_s`.
    pub requests_per_s: f64,
    /// Pings of `200` answers per second of `elapsed_s`.
    pub pings_per_s: f64,
    /// Latency over the whole window (open loop: from each request's due time).
    pub latency_ms: Percentiles,
    /// Latency by percentile, for plotting.
    pub distribution: Vec<DistributionPoint>,
    /// Latency per minute of the window (the last one may be partial).
    pub minutes: Vec<Minute>,
    /// Latency per second of the window.
    pub timeline: Vec<Second>,
}

/// The percentiles the distribution lists: 0, 50, 75, 87.5, … up to 99.9999, then 100.
pub fn distribution(h: &Histogram<u64>) -> Vec<DistributionPoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut tail = 1.0_f64;
    while tail > 1e-6 {
        let q = 1.0 - tail;
        out.push(DistributionPoint { percentile: q * 100.0, latency_ms: h.value_at_quantile(q) as f64 / 1000.0 });
        tail /= 2.0_f64.sqrt();
    }
    out.push(DistributionPoint { percentile: 100.0, latency_ms: h.max() as f64 / 1000.0 });
    out
}

impl LoadResult {
    /// The summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let rate = match self.target_rate {
            Some(r) => format!("open loop at {r:.0} requests/s"),
            None => "closed loop (flat out)".into(),
        };
        let _ = writeln!(
            s,
            "{}: {rate}, {} connections, {} ping{} per request, {} users{}, {} auth; {:.1} s measured after {:.1} s warm-up",
            self.url,
            self.connections,
            self.batch,
            if self.batch == 1 { "" } else { "s" },
            self.users,
            if self.user_churn_per_s > 0.0 {
                format!(" ({} replaced by new ones at {}/s)", self.users_churned, self.user_churn_per_s)
            } else {
                String::new()
            },
            self.auth,
            self.duration_s,
            self.warmup_s
        );
        let _ = writeln!(
            s,
            "throughput: {:.0} requests/s, {:.0} pings/s ({} requests, {} ok, {} pings; {} accepted, {} ignored, {} coupons)",
            self.requests_per_s,
            self.pings_per_s,
            self.requests,
            self.ok,
            self.pings,
            self.accepted,
            self.ignored,
            self.events
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "latency{}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            if self.target_rate.is_some() { " (from intended send times)" } else { "" },
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let list: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k} × {v}")).collect();
            let _ = writeln!(s, "errors: {}", list.join(", "));
        }
        if let (Some(rate), true) = (self.target_rate, self.duration_s > 0.0) {
            if self.requests_per_s < rate * 0.95 {
                let _ = writeln!(
                    s,
                    "note: {:.0} requests/s is below the target {rate:.0}: the server (or this generator) could not keep up",
                    self.requests_per_s
                );
            }
        }
        s
    }

    /// A self-contained HTML page: the summary, latency over time and the percentile
    /// distribution as inline SVG.
    pub fn html(&self) -> String {
        let mut page = String::new();
        let _ = write!(
            page,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>kabao loadgen</title><style>\
             body{{font:14px system-ui,sans-serif;margin:2em;color:#222}} pre{{background:#f6f6f6;padding:1em}}\
             svg{{background:#fff;border:1px solid #ddd;margin:0 0 2em}} text{{font:11px sans-serif}}\
             </style></head><body><h1>kabao loadgen</h1><pre>{}</pre>",
            escape(&self.summary())
        );
        page.push_str("<h2>Latency over time (per second)</h2>");
        let series = |f: fn(&Percentiles) -> f64| -> Vec<(f64, f64)> {
            self.timeline.iter().map(|s| (s.second as f64, f(&s.latency_ms))).collect()
        };
        page.push_str(&chart(
            "second of the measured window",
            "latency, ms",
            &[
                ("p50", "#1f77b4", series(|p| p.p50)),
                ("p99", "#ff7f0e", series(|p| p.p99)),
                ("max", "#d62728", series(|p| p.max)),
            ],
            false,
        ));
        page.push_str("<h2>Latency by percentile</h2>");
        // x = how many nines: −log10(1 − q), so 90 %, 99 %, 99.9 % are evenly spaced.
        let points: Vec<(f64, f64)> = self
            .distribution
            .iter()
            .filter(|d| d.percentile < 100.0)
            .map(|d| (-(1.0 - d.percentile / 100.0).log10(), d.latency_ms))
            .collect();
        page.push_str(&chart("percentile", "latency, ms", &[("latency", "#1f77b4", points)], true));
        page.push_str(
            "<h2>Per second</h2><table border=\"1\" cellpadding=\"3\" style=\"border-collapse:collapse\">\
                       <tr><th>second</th><th>requests</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th></tr>",
        );
        for s in &self.timeline {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
                s.second, s.requests, s.latency_ms.p50, s.latency_ms.p99, s.latency_ms.max
            );
        }
        page.push_str("</table></body></html>\n");
        page
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One line of a chart: its name, its colour and its (x, y) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart. `nines` labels the x axis as percentiles (x = −log10(1 − q)).
fn chart(x_label: &str, y_label: &str, series: &[Series<'_>], nines: bool) -> String {
    const W: f64 = 760.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 60.0;
    const BOTTOM: f64 = 40.0;
    let all = series.iter().flat_map(|(_, _, p)| p.iter());
    let x_max = all.clone().map(|p| p.0).fold(0.0_f64, f64::max).max(1.0);
    let y_max = all.map(|p| p.1).fold(0.0_f64, f64::max).max(0.001) * 1.1;
    let px = |x: f64| LEFT + x / x_max * (W - LEFT - 20.0);
    let py = |y: f64| H - BOTTOM - y / y_max * (H - BOTTOM - 20.0);
    let mut svg =
        format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">");
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"20\" x2=\"{LEFT}\" y2=\"{0}\" stroke=\"#888\"/>",
        H - BOTTOM,
        W - 20.0
    );
    for i in 0..=4 {
        let y = y_max * i as f64 / 4.0;
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.2}</text><line x1=\"{LEFT}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#eee\"/>",
            LEFT - 4.0,
            py(y),
            W - 20.0
        );
    }
    if nines {
        for (x, label) in [(0.0, "0"), (1.0, "90"), (2.0, "99"), (3.0, "99.9"), (4.0, "99.99"), (5.0, "99.999")] {
            if x <= x_max {
                let _ = write!(
                    svg,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
                    px(x),
                    H - BOTTOM + 14.0
                );
            }
        }
    } else {
        for i in 0..=5 {
            let x = x_max * i as f64 / 5.0;
            let _ =
                write!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x:.0}</text>", px(x), H - BOTTOM + 14.0);
        }
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text><text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {3})\" text-anchor=\"middle\">{}</text>",
        (W + LEFT) / 2.0,
        H - 6.0,
        escape(x_label),
        H / 2.0,
        escape(y_label)
    );
    for (k, (name, color, points)) in series.iter().enumerate() {
        let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            path.join(" ")
        );
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            LEFT + 10.0 + 70.0 * k as f64,
            14.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_rises_to_the_max_and_the_page_is_self_contained() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for us in 1..=10_000u64 {
            h.record(us).unwrap();
        }
        let d = distribution(&h);
        assert!(d.windows(2).all(|w| w[0].latency_ms <= w[1].latency_ms && w[0].percentile < w[1].percentile));
        assert_eq!(d.last().unwrap().percentile, 100.0);
        let p = Percentiles::of(&h);
        assert!((p.p50 - 5.0).abs() < 0.01 && (p.p99 - 9.9).abs() < 0.01, "{p:?}");

        let result = LoadResult {
            url: "http://127.0.0.1:1".into(),
            mode: "open",
            target_rate: Some(100.0),
            connections: 1,
            batch: 1,
            auth: "admin",
            users: 1,
            user_churn_per_s: 0.0,
            users_churned: 0,
            warmup_s: 0.0,
            duration_s: 1.0,
            elapsed_s: 1.0,
            requests: 100,
            ok: 99,
            pings: 99,
            accepted: 99,
            ignored: 0,
            events: 0,
            errors: BTreeMap::from([("503".to_owned(), 1)]),
            requests_per_s: 100.0,
            pings_per_s: 99.0,
            latency_ms: p,
            distribution: d,
            minutes: vec![Minute { minute: 0, requests: 100, latency_ms: Percentiles::of(&h) }],
            timeline: vec![Second { second: 0, requests: 100, latency_ms: Percentiles::of(&h) }],
        };
        assert!(result.summary().contains("503 × 1"));
        let page = result.html();
        assert!(page.contains("<svg") && page.contains("polyline"));
        assert!(!page.contains("<script") && !page.contains("src="));
    }
}
