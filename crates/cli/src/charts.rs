//! Charts as PNG, drawn directly with the `image` crate and a built-in 5×7 pixel font (no
//! fonts or plotting stack needed): `kollava plot` draws a run's `metrics.jsonl` (loss on
//! top, learning rate below, against the step); `eval summarize --chart` the relative
//! review scores per category and `data check --histogram` the token lengths, as bars.

use std::path::Path;

use image::{Rgb, RgbImage};

const W: u32 = 900;
const H: u32 = 620;
const MARGIN_L: u32 = 110;
const MARGIN_R: u32 = 30;

/// Rows of a 5×7 glyph, high bit first of the low 5 bits.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c.to_ascii_lowercase() {
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'j' => [0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'q' => [0, 0, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        ' ' => [0; 7],
        _ => return None,
    })
}

/// Writes `text` with its top-left corner at `(x, y)`, `scale` pixels per font pixel.
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, scale: u32, colour: Rgb<u8>) {
    for (k, c) in s.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let px = x + (k as u32 * 6 + col) * scale + dx;
                        let py = y + r as u32 * scale + dy;
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, colour);
                        }
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), colour: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (0, 1), (1, 0)] {
            let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, colour);
            }
        }
    }
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel: a series against the step, in the box `top..top+height`.
fn panel(
    img: &mut RgbImage,
    top: u32,
    height: u32,
    title: &str,
    points: &[(f64, f64)],
    colour: Rgb<u8>,
) {
    let grey = Rgb([170, 170, 170]);
    let black = Rgb([20, 20, 20]);
    let (left, right) = (MARGIN_L as f64, (W - MARGIN_R) as f64);
    let (y_top, y_bottom) = (top as f64 + 30.0, (top + height) as f64 - 30.0);
    text(img, MARGIN_L, top + 6, title, 3, black);
    for (a, b) in [
        ((left, y_top), (right, y_top)),
        ((left, y_bottom), (right, y_bottom)),
        ((left, y_top), (left, y_bottom)),
        ((right, y_top), (right, y_bottom)),
    ] {
        line(img, a, b, grey);
    }
    let (xmin, xmax) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let xspan = (xmax - xmin).max(1e-12);
    let yspan = (ymax - ymin).max(1e-12);
    let to_px = |(x, y): (f64, f64)| {
        (
            left + (x - xmin) / xspan * (right - left),
            y_bottom - (y - ymin) / yspan * (y_bottom - y_top),
        )
    };
    for w in points.windows(2) {
        line(img, to_px(w[0]), to_px(w[1]), colour);
    }
    text(img, 8, y_top as u32, &label(ymax), 2, black);
    text(img, 8, y_bottom as u32 - 14, &label(ymin), 2, black);
    text(
        img,
        MARGIN_L,
        y_bottom as u32 + 6,
        &format!("step {}", xmin as u64),
        2,
        black,
    );
    let end = format!("{}", xmax as u64);
    text(
        img,
        W - MARGIN_R - 12 * end.len() as u32,
        y_bottom as u32 + 6,
        &end,
        2,
        black,
    );
}

/// Reads `metrics` (JSON Lines with `step`, `loss`, `lr`) and writes the plot to `out`.
/// Returns the number of steps plotted.
pub fn plot(metrics: &Path, out: &Path) -> Result<usize, String> {
    let text_in =
        std::fs::read_to_string(metrics).map_err(|e| format!("{}: {e}", metrics.display()))?;
    let mut loss = Vec::new();
    let mut lr = Vec::new();
    for (i, l) in text_in
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(l)
            .map_err(|e| format!("{}: line {}: {e}", metrics.display(), i + 1))?;
        let Some(step) = v["step"].as_f64() else {
            return Err(format!(
                "{}: line {}: no \"step\"",
                metrics.display(),
                i + 1
            ));
        };
        if let Some(x) = v["loss"].as_f64() {
            loss.push((step, x));
        }
        if let Some(x) = v["lr"].as_f64() {
            lr.push((step, x));
        }
    }
    if loss.len() < 2 {
        return Err(format!(
            "{}: fewer than two steps to plot",
            metrics.display()
        ));
    }
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    panel(&mut img, 0, H * 3 / 5, "loss", &loss, Rgb([31, 119, 180]));
    if lr.len() >= 2 {
        panel(
            &mut img,
            H * 3 / 5,
            H * 2 / 5,
            "learning rate",
            &lr,
            Rgb([255, 127, 14]),
        );
    }
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(loss.len())
}

/// Bars of `(label, value)` per panel (one panel per `(title, bars)`), with a dashed line
/// at `reference` (100 for relative scores) and each value written above its bar.
pub fn bar_chart(
    panels: &[(String, Vec<(String, f64)>)],
    reference: f64,
    out: &Path,
) -> Result<(), String> {
    if panels.is_empty() || panels.iter().all(|(_, b)| b.is_empty()) {
        return Err("nothing to chart".into());
    }
    let panel_h = 260u32;
    let mut img = RgbImage::from_pixel(W, panel_h * panels.len() as u32, Rgb([255, 255, 255]));
    let black = Rgb([20, 20, 20]);
    let grey = Rgb([170, 170, 170]);
    for (p, (title, bars)) in panels.iter().enumerate() {
        let top = p as u32 * panel_h;
        text(&mut img, 20, top + 8, title, 2, black);
        let max = bars.iter().map(|b| b.1).fold(reference, f64::max).max(1e-9) * 1.15;
        let (y0, y1) = ((top + panel_h - 40) as f64, (top + 40) as f64);
        let to_y = |v: f64| y0 - v.max(0.0) / max * (y0 - y1);
        line(&mut img, (40.0, y0), ((W - 20) as f64, y0), grey);
        let ry = to_y(reference);
        let mut x = 40.0;
        while x < (W - 20) as f64 {
            line(
                &mut img,
                (x, ry),
                ((x + 6.0).min((W - 20) as f64), ry),
                grey,
            );
            x += 12.0;
        }
        let slot = ((W - 80) as f64 / bars.len().max(1) as f64).min(160.0);
        for (k, (label, v)) in bars.iter().enumerate() {
            let left = 60.0 + k as f64 * slot;
            let width = slot * 0.6;
            let y = to_y(*v);
            for px in left as u32..(left + width) as u32 {
                for py in y as u32..y0 as u32 {
                    img.put_pixel(px, py, Rgb([31, 119, 180]));
                }
            }
            text(
                &mut img,
                left as u32,
                (y as u32).saturating_sub(18),
                &format!("{v:.1}"),
                2,
                black,
            );
            text(&mut img, left as u32, y0 as u32 + 8, label, 2, black);
        }
    }
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_curve_is_drawn_falling() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let lines: String = (1..=50)
            .map(|s| {
                format!(
                    "{{\"step\": {s}, \"loss\": {}, \"lr\": {}}}\n",
                    5.0 / s as f64,
                    1e-3
                )
            })
            .collect();
        std::fs::write(&metrics, lines).unwrap();
        let out = dir.path().join("plot.png");
        assert_eq!(plot(&metrics, &out).unwrap(), 50);
        let img = image::open(&out).unwrap().to_rgb8();
        let blue = Rgb([31, 119, 180]);
        // The first loss point is high on the left, the last low on the right.
        let column_rows = |x: u32| {
            (0..H)
                .filter(|&y| *img.get_pixel(x, y) == blue)
                .collect::<Vec<_>>()
        };
        let left = column_rows(MARGIN_L + 1);
        let right = column_rows(W - MARGIN_R - 1);
        assert!(!left.is_empty() && !right.is_empty());
        assert!(
            left.iter().min() < right.iter().min(),
            "{left:?} vs {right:?}"
        );
        std::fs::write(&metrics, "not json\n").unwrap();
        assert!(plot(&metrics, &out).unwrap_err().contains("line 1"));
    }
}
