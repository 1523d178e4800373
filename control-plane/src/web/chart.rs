//! Server-side SVG bar charts for the console (no script, no external request): one series of
//! labelled values, scaled to the largest, with the value in each bar's `<title>` (a tooltip)
//! and an accessible `<title>` for the chart.

/// Escapes text for SVG (XML) content and attributes.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A bar chart of `points` (label, value), each value shown by `fmt`.
pub fn bars(title: &str, points: &[(String, f64)], fmt: impl Fn(f64) -> String) -> String {
    const W: f64 = 480.0;
    const H: f64 = 160.0;
    const TOP: f64 = 20.0;
    const BOTTOM: f64 = 20.0;
    let max = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let n = points.len().max(1) as f64;
    let slot = W / n;
    let plot = H - TOP - BOTTOM;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" \
         aria-label=\"{t}\"><title>{t}</title><text x=\"0\" y=\"12\" class=\"chart-title\">{t} (max {m})</text>",
        t = esc(title),
        m = esc(&fmt(max)),
    );
    for (i, (label, v)) in points.iter().enumerate() {
        let h = if max > 0.0 { plot * v / max } else { 0.0 };
        let x = i as f64 * slot + slot * 0.1;
        let y = TOP + plot - h;
        out.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" class=\"bar\"><title>{l}: {v}</title></rect>",
            w = slot * 0.8,
            l = esc(label),
            v = esc(&fmt(*v)),
        ));
        // Label every bar when few, else every fourth.
        if points.len() <= 8 || i % 4 == 0 {
            out.push_str(&format!(
                "<text x=\"{x:.1}\" y=\"{ly}\" class=\"axis\">{l}</text>",
                ly = H - 4.0,
                l = esc(label)
            ));
        }
    }
    out.push_str(&format!(
        "<line x1=\"0\" y1=\"{b}\" x2=\"{W}\" y2=\"{b}\" class=\"baseline\"/></svg>",
        b = TOP + plot
    ));
    out
}

/// A timeline of events at offsets (ms from the start): a tick per event on one axis, its label
/// and offset in the tick's `<title>`, the axis labelled with 0 and the last offset.
pub fn timeline(title: &str, events: &[(u64, String)]) -> String {
    const W: f64 = 480.0;
    const H: f64 = 70.0;
    const LEFT: f64 = 10.0;
    const RIGHT: f64 = 10.0;
    let end = events.iter().map(|e| e.0).max().unwrap_or(0).max(1) as f64;
    let span = W - LEFT - RIGHT;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart timeline\" viewBox=\"0 0 {W} {H}\" role=\"img\" \
         aria-label=\"{t}\"><title>{t}</title><text x=\"0\" y=\"12\" class=\"chart-title\">{t}</text>\
         <line x1=\"{LEFT}\" y1=\"40\" x2=\"{x2}\" y2=\"40\" class=\"baseline\"/>",
        t = esc(title),
        x2 = W - RIGHT,
    );
    for (offset, label) in events {
        let x = LEFT + span * (*offset as f64) / end;
        out.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"26\" x2=\"{x:.1}\" y2=\"40\" class=\"tick\"><title>{o} ms: {l}</title></line>",
            o = offset,
            l = esc(label),
        ));
    }
    out.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"58\" class=\"axis\">0 ms</text><text x=\"{x}\" y=\"58\" class=\"axis\" \
         text-anchor=\"end\">{e} ms</text></svg>",
        x = W - RIGHT,
        e = end as u64,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_and_escape_labels() {
        let svg = bars("Requests <per hour>", &[("a&b".into(), 2.0), ("c".into(), 4.0)], |v| {
            format!("{v}")
        });
        assert!(svg.starts_with("<svg "));
        assert!(svg.contains("Requests &lt;per hour&gt;"));
        assert!(svg.contains("a&amp;b: 2"));
        // The largest bar fills the plot (120 px), the other half of it.
        assert!(svg.contains("height=\"120.0\""), "{svg}");
        assert!(svg.contains("height=\"60.0\""), "{svg}");
        assert!(!bars("empty", &[], |v| format!("{v}")).contains("<rect"));
    }

    #[test]
    fn timeline_places_events_by_offset() {
        let svg = timeline(
            "Stream",
            &[
                (0, "message_start".into()),
                (100, "content_block_delta <x>".into()),
                (200, "message_stop".into()),
            ],
        );
        // 0 at the left edge (10), 200 ms at the right (470), 100 ms halfway.
        assert!(svg.contains("x1=\"10.0\""), "{svg}");
        assert!(svg.contains("x1=\"240.0\""), "{svg}");
        assert!(svg.contains("x1=\"470.0\""), "{svg}");
        assert!(svg.contains("100 ms: content_block_delta &lt;x&gt;"), "{svg}");
        assert!(svg.contains(">200 ms</text>"), "{svg}");
    }
}
