//! A hand-written SVG chart of the results: one horizontal bar panel per figure, the issue's
//! goals as dashed lines.

use std::fmt::Write as _;

use super::{Proxy, Workload, results::Results};

const WIDTH: f64 = 980.0;
const LABEL_WIDTH: f64 = 230.0;
const BAR_AREA: f64 = 620.0;
const BAR: f64 = 18.0;
const STEP: f64 = 24.0;
const TITLE: f64 = 34.0;
const PANEL_GAP: f64 = 18.0;

/// One panel: a title, a value per system, and an optional goal.
struct Panel {
    title: &'static str,
    values: Vec<(Proxy, f64)>,
    goal: Option<(f64, &'static str)>,
    decimals: usize,
}

fn colour(p: Proxy) -> &'static str {
    match p {
        Proxy::Direct => "#9e9e9e",
        Proxy::NginxCommon => "#f6b26b",
        Proxy::NginxTuned => "#e69138",
        Proxy::Haproxy => "#6fa8dc",
        Proxy::HaproxyTcp => "#3d85c6",
        Proxy::NtlmTagEbpf => "#38761d",
        Proxy::NtlmTagNoEbpf => "#93c47d",
        Proxy::NtlmTagXdp => "#274e13",
    }
}

fn values(
    results: &Results,
    workload: Workload,
    f: impl Fn(&super::results::Measurement) -> Option<f64>,
) -> Vec<(Proxy, f64)> {
    Proxy::MAIN
        .iter()
        .filter_map(|p| results.get(*p, workload).and_then(&f).map(|v| (*p, v)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

fn panels(results: &Results) -> Vec<Panel> {
    vec![
        Panel {
            title: "Proxy CPU per keep-alive request, µs (lower is better)",
            values: values(results, Workload::KeepAlive, |m| m.cpu_us_per_request),
            goal: Some((10.0, "goal ≤ 10 µs")),
            decimals: 1,
        },
        Panel {
            title: "Keep-alive requests per second, 64 connections",
            values: values(results, Workload::KeepAlive, |m| Some(m.per_second)),
            goal: None,
            decimals: 0,
        },
        Panel {
            title: "New connections (one request each) per second",
            values: values(results, Workload::NewConnection, |m| Some(m.per_second)),
            goal: None,
            decimals: 0,
        },
        Panel {
            title: "Proxy CPU per new connection + request, µs (lower is better)",
            values: values(results, Workload::NewConnection, |m| m.cpu_us_per_request),
            goal: None,
            decimals: 1,
        },
        Panel {
            title: "Full NTLMv2 handshakes per second",
            values: values(results, Workload::Ntlm, |m| Some(m.per_second)),
            goal: None,
            decimals: 0,
        },
        Panel {
            title: "Resident memory per idle keep-alive connection, KiB (lower is better)",
            values: values(results, Workload::Idle, |m| {
                m.idle.as_ref().map(|i| i.kib_per_connection())
            }),
            goal: Some((16.0, "goal ≤ 16 KiB")),
            decimals: 1,
        },
    ]
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn panel_height(p: &Panel) -> f64 {
    TITLE + p.values.len().max(1) as f64 * STEP + PANEL_GAP
}

fn draw_panel(out: &mut String, p: &Panel, top: f64) {
    let _ = writeln!(
        out,
        r#"<text x="10" y="{:.0}" font-size="15" font-weight="bold">{}</text>"#,
        top + 20.0,
        escape(p.title)
    );
    let max = p
        .values
        .iter()
        .map(|(_, v)| *v)
        .chain(p.goal.map(|g| g.0))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.08;
    let scale = BAR_AREA / max;
    for (i, (proxy, v)) in p.values.iter().enumerate() {
        let y = top + TITLE + i as f64 * STEP;
        let w = (v * scale).max(1.0);
        let _ = writeln!(
            out,
            r#"<text x="{:.0}" y="{:.0}" font-size="13" text-anchor="end">{}</text><rect x="{LABEL_WIDTH}" y="{y:.0}" width="{w:.1}" height="{BAR}" fill="{}"/><text x="{:.1}" y="{:.0}" font-size="12">{:.*}</text>"#,
            LABEL_WIDTH - 8.0,
            y + 14.0,
            escape(proxy.label()),
            colour(*proxy),
            LABEL_WIDTH + w + 5.0,
            y + 14.0,
            p.decimals,
            v
        );
    }
    if let Some((goal, label)) = p.goal {
        let x = LABEL_WIDTH + goal * scale;
        let bottom = top + TITLE + p.values.len() as f64 * STEP;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.0}" x2="{x:.1}" y2="{bottom:.0}" stroke="#cc0000" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.0}" font-size="11" fill="#cc0000">{}</text>"##,
            top + TITLE - 4.0,
            x + 4.0,
            bottom + 8.0,
            escape(label)
        );
    }
}

pub fn svg(results: &Results, stamp: &str) -> String {
    let panels = panels(results);
    let height: f64 = 50.0 + panels.iter().map(panel_height).sum::<f64>();
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="26" font-size="18" font-weight="bold">ntlm-tag vs nginx, HAProxy and the backend alone: one core per proxy ({})</text>
"#,
        escape(stamp)
    );
    let mut top = 40.0;
    for p in &panels {
        draw_panel(&mut out, p, top);
        top += panel_height(p);
    }
    out.push_str("</svg>\n");
    out
}
