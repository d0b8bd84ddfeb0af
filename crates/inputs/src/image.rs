//! Image decoding and CLIP preprocessing, bit-exact with the Python reference.
//!
//! The reference opens images with Pillow, calls `.convert('RGB')`, optionally pads them to a
//! square (`expand2square`), then runs transformers' `CLIPImageProcessor`: a shortest-edge
//! bicubic resize done by Pillow, an integer center crop, a rescale computed in f64 and a
//! normalisation in f32 (llava-spec §3). Neither the `image` crate nor any resize crate
//! reproduces Pillow's fixed-point bicubic filter, so [`resize_bicubic`] implements Pillow's
//! algorithm (`libImaging/Resample.c`) directly; the fixtures' `pixel_u8.*` tensors pin it.
//!
//! JPEG goes through libjpeg-turbo's decoder (the `mozjpeg` fork: accurate integer IDCT and
//! smoothed chroma upsampling, Pillow's defaults), which gives Pillow's bytes exactly; pure-Rust
//! decoders are off by up to 3 levels. PNG/GIF/BMP/WebP use the `image` crate.
//!
//! This module owns pixels only: no tensors, no model types. Sizes are `(width, height)`.

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use image::{DynamicImage, ImageReader};

/// Decompression-bomb guard: Pillow warns at ~89 MP and refuses at twice that; we refuse
/// anything over 100 MP before allocating the decoded buffer.
pub const MAX_PIXELS: u64 = 100_000_000;

/// The CLIP normalisation constants every LLaVA vision tower uses (`image_mean`/`image_std`
/// of openai/clip-vit-large-patch14), written as the JSON spells them.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// Errors from reading or decoding an image. Each names the input at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error("cannot read image {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{what} is not a readable image ({reason})")]
    Decode { what: String, reason: String },
    #[error(
        "{what} is {width}x{height} = {} megapixels, over the {} megapixel limit",
        (*width as u64 * *height as u64) / 1_000_000,
        MAX_PIXELS / 1_000_000
    )]
    TooLarge {
        what: String,
        width: u32,
        height: u32,
    },
    #[error("{what} has an empty size {width}x{height}")]
    Empty {
        what: String,
        width: u32,
        height: u32,
    },
}

/// An 8-bit RGB image, rows top to bottom, `[r, g, b]` per pixel (Pillow's mode `RGB`).
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    /// `height * width * 3` bytes, HWC.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// A `width`x`height` image filled with one colour (Pillow's `Image.new`).
    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> Self {
        let n = width as usize * height as usize;
        let mut data = Vec::with_capacity(n * 3);
        for _ in 0..n {
            data.extend_from_slice(&rgb);
        }
        Self {
            width,
            height,
            data,
        }
    }

    fn row_bytes(&self) -> usize {
        self.width as usize * 3
    }
}

/// How an image is fitted to the tower's square input (llava-spec §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum AspectMode {
    /// Shortest-edge resize then center crop: the CLIP processor alone (`square`, v0, llava-hf).
    Crop,
    /// `expand2square` with the mean colour, then the processor (LLaVA-1.5 `pad`).
    Pad,
    /// Plain resize to S x S, then the processor (a no-op crop). The web UI's `Resize`.
    Resize,
}

impl AspectMode {
    /// The fixtures' and the reference config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            AspectMode::Crop => "crop",
            AspectMode::Pad => "pad",
            AspectMode::Resize => "resize",
        }
    }
}

/// The resolved `preprocessor_config.json` of a CLIP tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    /// `size.shortest_edge`.
    pub shortest_edge: u32,
    /// `crop_size` as `(width, height)`.
    pub crop: (u32, u32),
    /// `rescale_factor` (1/255), applied in f64 as numpy does.
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ClipPreprocess {
    /// The standard OpenAI CLIP processor for a square tower of side `size`.
    pub fn square(size: u32) -> Self {
        Self {
            shortest_edge: size,
            crop: (size, size),
            rescale_factor: 1.0 / 255.0,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// `expand2square`'s fill colour: `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_colour(&self) -> [u8; 3] {
        // Truncation, as Python's int(); mean values are in [0, 1].
        self.mean.map(|m| (m as f64 * 255.0) as u8)
    }
}

/// Reads and decodes an image file, converted to RGB as Pillow's `convert('RGB')` does.
pub fn open(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|e| ImageError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    decode(&bytes, &path.display().to_string())
}

/// Decodes image bytes (PNG, JPEG, GIF first frame, BMP, WebP) to RGB. `what` names the
/// input in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<RgbImage, ImageError> {
    let decode_err = |e: image::ImageError| ImageError::Decode {
        what: what.to_string(),
        reason: e.to_string(),
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    if reader.format().is_none() {
        return Err(ImageError::Decode {
            what: what.to_string(),
            reason: "unknown format; expected PNG, JPEG, GIF, BMP or WebP".into(),
        });
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        // libjpeg cannot convert every colour space (CMYK); fall back to `image` for those.
        if let Some(img) = decode_jpeg_like_pillow(bytes, what)? {
            return Ok(img);
        }
    }
    // Read the header first so a decompression bomb is refused before any allocation.
    let (width, height) = reader.into_dimensions().map_err(decode_err)?;
    check_size(what, width, height)?;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(decode_err)?;
    Ok(to_rgb_like_pillow(img))
}

/// libjpeg-turbo's decode to RGB. `Ok(None)` when libjpeg refuses the colour conversion.
fn decode_jpeg_like_pillow(bytes: &[u8], what: &str) -> Result<Option<RgbImage>, ImageError> {
    let fail = |reason: String| ImageError::Decode {
        what: what.to_string(),
        reason,
    };
    // mozjpeg reports libjpeg errors by unwinding; contain them here.
    let header = crate::untrusted::guard(|| {
        mozjpeg::Decompress::new_mem(bytes).map(|d| (d.width() as u32, d.height() as u32))
    });
    let (width, height) = match header {
        Ok(Ok(dims)) => dims,
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(text) => return Err(fail(text)),
    };
    check_size(what, width, height)?;
    let ran_out = AtomicBool::new(false);
    let decoded = crate::untrusted::guard(|| -> std::io::Result<Vec<u8>> {
        let src = EofWatch {
            bytes,
            ran_out: &ran_out,
        };
        let mut s = mozjpeg::Decompress::new_reader(src)?.rgb()?;
        let px: Vec<u8> = s.read_scanlines::<u8>()?;
        // Checked before `finish`: like Pillow, a file cut after its last row (only the
        // end marker missing) still decodes.
        if ran_out.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "truncated: the data ends before the last row",
            ));
        }
        s.finish()?;
        Ok(px)
    });
    match decoded {
        Ok(Ok(data)) if data.len() == width as usize * height as usize * 3 => Ok(Some(RgbImage {
            width,
            height,
            data,
        })),
        Ok(Ok(_)) => Err(fail("truncated JPEG data".into())),
        Ok(Err(e)) if e.to_string().contains("color conversion") => Ok(None),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(text) => {
            if text.contains("color conversion") {
                Ok(None)
            } else {
                Err(fail(text))
            }
        }
    }
}

/// The JPEG bytes for libjpeg, remembering whether it asked for more than there is. On a
/// truncated file libjpeg only warns, fakes an end marker and fills the missing rows with
/// grey; Pillow raises "image file is truncated", and so do we.
struct EofWatch<'a> {
    bytes: &'a [u8],
    ran_out: &'a AtomicBool,
}

impl std::io::Read for EofWatch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.bytes.read(buf)
    }
}

impl std::io::BufRead for EofWatch<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.bytes.is_empty() {
            self.ran_out.store(true, Ordering::Relaxed);
        }
        Ok(self.bytes)
    }

    fn consume(&mut self, n: usize) {
        self.bytes = &self.bytes[n.min(self.bytes.len())..];
    }
}

fn check_size(what: &str, width: u32, height: u32) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Empty {
            what: what.to_string(),
            width,
            height,
        });
    }
    if width as u64 * height as u64 > MAX_PIXELS {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            width,
            height,
        });
    }
    Ok(())
}

/// Pillow's `convert('RGB')`: alpha is dropped (never composited), grey is copied to three
/// channels. 16-bit inputs follow Pillow's raw modes: 16-bit RGB keeps the high byte, 16-bit
/// grey (`I;16`) is clipped to 255.
fn to_rgb_like_pillow(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageLuma16(b) => b
            .into_raw()
            .iter()
            .flat_map(|&v| {
                let c = v.min(255) as u8;
                [c, c, c]
            })
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let c = p[0].min(255) as u8;
                [c, c, c]
            })
            .collect(),
        DynamicImage::ImageRgb16(b) => b.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage {
        width,
        height,
        data,
    }
}

/// `img`, or for a picture so elongated that its padded square would pass [`MAX_PIXELS`]
/// (a long side over 10,000 pixels), the picture shrunk (bicubic) until the square fits.
/// The reference pads at full size; a 1 KB JPEG declaring 65,000 x 255 pixels would make it
/// build a 4-gigapixel canvas, so such pictures (none a camera takes) differ from it
/// slightly, and everything else is padded exactly as it does.
fn within_square_limit(img: &RgbImage) -> std::borrow::Cow<'_, RgbImage> {
    let long = img.width.max(img.height) as u64;
    if long * long <= MAX_PIXELS {
        return std::borrow::Cow::Borrowed(img);
    }
    let side = (MAX_PIXELS as f64).sqrt() as u64;
    let scale = |x: u32| ((x as u64 * side) / long).max(1) as u32;
    std::borrow::Cow::Owned(resize_bicubic(img, scale(img.width), scale(img.height)))
}

/// LLaVA-1.5's `expand2square`: paste onto a square canvas of the longer side, centred on the
/// short axis with offset `(long - short) // 2`.
pub fn expand_to_square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::filled(side, side, fill);
    let (left, top) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    let out_row = out.row_bytes();
    for y in 0..h as usize {
        let src = &img.data[y * img.row_bytes()..(y + 1) * img.row_bytes()];
        let start = (y + top as usize) * out_row + left as usize * 3;
        out.data[start..start + src.len()].copy_from_slice(src);
    }
    out
}

/// Pillow's BICUBIC kernel (Keys, a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's fixed-point precision for 8-bit resampling: `32 - 8 - 2` bits.
const PRECISION_BITS: u32 = 22;

/// One output position's taps: first source index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` of Pillow's Resample.c for a full-box resize
/// from `in_size` to `out_size`, for the output positions in `range` only.
fn taps(in_size: u32, out_size: u32, range: std::ops::Range<u32>) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut all = Vec::with_capacity(range.len());
    for xx in range {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Pillow casts with (int), truncating toward zero, then clamps.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;
        let mut k: Vec<f64> = (0..n)
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            for v in &mut k {
                *v /= ww;
            }
        }
        let one = (1i64 << PRECISION_BITS) as f64;
        let weights = k
            .iter()
            .map(|&v| {
                if v < 0.0 {
                    (-0.5 + v * one) as i32
                } else {
                    (0.5 + v * one) as i32
                }
            })
            .collect();
        all.push(Taps {
            start: xmin as usize,
            weights,
        });
    }
    all
}

fn clip8(acc: i64) -> u8 {
    if acc >= (1i64 << PRECISION_BITS) * 256 {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit for bit:
/// two separable passes, each rounding to u8. Same size returns a copy.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_bicubic_window(img, (width, height), (0, 0), (width, height))
}

/// `resize_bicubic` followed by a crop of `size` at `origin`, computing only the kept pixels.
/// Each output pixel depends only on its own taps, so the result equals the full resize then
/// crop, while an extreme aspect ratio cannot blow up memory in the intermediate image.
///
/// Pass order matters for the rounding in between. Pillow (≥ 11, `ImagingResampleInner`)
/// runs the vertical pass first when the height shrinks by more than twice as many pixels as
/// the width, else the horizontal pass first; the fixtures were made that way.
fn resize_bicubic_window(
    img: &RgbImage,
    (width, height): (u32, u32),
    (left, top): (u32, u32),
    (crop_w, crop_h): (u32, u32),
) -> RgbImage {
    let shrink_h = img.height as i64 - height as i64;
    let shrink_w = img.width as i64 - width as i64;
    let vertical_first = shrink_h > 0 && shrink_h > shrink_w * 2;
    if vertical_first {
        let v = vertical_pass(img, height, top, crop_h);
        horizontal_pass(&v, width, left, crop_w)
    } else {
        let h = horizontal_pass(img, width, left, crop_w);
        vertical_pass(&h, height, top, crop_h)
    }
}

/// Resamples the width to `width` (or only crops when it already is), keeping output
/// columns `left..left + keep`.
fn horizontal_pass(cur: &RgbImage, width: u32, left: u32, keep: u32) -> RgbImage {
    if width == cur.width {
        return if (left, keep) == (0, width) {
            cur.clone()
        } else {
            center_crop_at(cur, left as i64, 0, keep, cur.height)
        };
    }
    let taps = taps(cur.width, width, left..left + keep);
    let mut out = Vec::with_capacity(keep as usize * cur.height as usize * 3);
    for y in 0..cur.height as usize {
        let row = &cur.data[y * cur.row_bytes()..(y + 1) * cur.row_bytes()];
        for t in &taps {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, &w) in t.weights.iter().enumerate() {
                let p = (t.start + i) * 3;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += row[p + c] as i64 * w as i64;
                }
            }
            out.extend(acc.map(clip8));
        }
    }
    RgbImage {
        width: keep,
        height: cur.height,
        data: out,
    }
}

/// Resamples the height to `height` (or only crops), keeping output rows `top..top + keep`.
fn vertical_pass(cur: &RgbImage, height: u32, top: u32, keep: u32) -> RgbImage {
    if height == cur.height {
        return if (top, keep) == (0, height) {
            cur.clone()
        } else {
            center_crop_at(cur, 0, top as i64, cur.width, keep)
        };
    }
    let taps = taps(cur.height, height, top..top + keep);
    let rb = cur.row_bytes();
    let mut out = Vec::with_capacity(rb * keep as usize);
    for t in &taps {
        let mut acc = vec![1i64 << (PRECISION_BITS - 1); rb];
        for (i, &w) in t.weights.iter().enumerate() {
            let row = &cur.data[(t.start + i) * rb..(t.start + i + 1) * rb];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as i64 * w as i64;
            }
        }
        out.extend(acc.into_iter().map(clip8));
    }
    RgbImage {
        width: cur.width,
        height: keep,
        data: out,
    }
}

/// Center crop as transformers' `center_crop`: `top = (h - ch) // 2`, `left = (w - cw) // 2`.
/// A crop larger than the image pads with zeros around it, as transformers does.
pub fn center_crop(img: &RgbImage, crop_w: u32, crop_h: u32) -> RgbImage {
    if img.width == crop_w && img.height == crop_h {
        return img.clone();
    }
    let top = (img.height as i64 - crop_h as i64).div_euclid(2);
    let left = (img.width as i64 - crop_w as i64).div_euclid(2);
    center_crop_at(img, left, top, crop_w, crop_h)
}

/// Crops `crop_w`x`crop_h` at `(left, top)`; pixels outside the source are black.
fn center_crop_at(img: &RgbImage, left: i64, top: i64, crop_w: u32, crop_h: u32) -> RgbImage {
    let mut out = RgbImage::filled(crop_w, crop_h, [0, 0, 0]);
    for y in 0..crop_h as i64 {
        let sy = y + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..crop_w as i64 {
            let sx = x + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let s = (sy as usize * img.width as usize + sx as usize) * 3;
            let d = (y as usize * crop_w as usize + x as usize) * 3;
            out.data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    out
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side
/// becomes `shortest_edge`, the long side `int(shortest_edge * long / short)`.
pub fn shortest_edge_size(width: u32, height: u32, shortest_edge: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (shortest_edge as f64 * long as f64 / short as f64) as u32;
    if width <= height {
        (shortest_edge, new_long)
    } else {
        (new_long, shortest_edge)
    }
}

/// The image as the tower sees it, before rescale/normalise (the fixtures' `pixel_u8`).
pub fn fit(img: &RgbImage, mode: AspectMode, cfg: &ClipPreprocess) -> RgbImage {
    let staged = match mode {
        AspectMode::Crop => img.clone(),
        AspectMode::Pad => expand_to_square(&within_square_limit(img), cfg.pad_colour()),
        AspectMode::Resize => resize_bicubic(img, cfg.crop.0, cfg.crop.1),
    };
    let (w, h) = shortest_edge_size(staged.width, staged.height, cfg.shortest_edge);
    let (cw, ch) = cfg.crop;
    if cw <= w && ch <= h {
        resize_bicubic_window(&staged, (w, h), ((w - cw) / 2, (h - ch) / 2), (cw, ch))
    } else {
        center_crop(&resize_bicubic(&staged, w, h), cw, ch)
    }
}

/// Rescale and normalise to CHW f32: `x = f32(u8 * (1/255) in f64)`, then `(x - mean) / std`
/// in f32, as transformers' `rescale` and `normalize` compute it.
pub fn normalize(img: &RgbImage, cfg: &ClipPreprocess) -> Vec<f32> {
    let plane = img.width as usize * img.height as usize;
    let mut out = vec![0f32; plane * 3];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = (px[c] as f64 * cfg.rescale_factor) as f32;
            out[c * plane + i] = (x - cfg.mean[c]) / cfg.std[c];
        }
    }
    out
}

/// The full pipeline: fit to the tower's input, then normalise. Returns `(3, H, W)` CHW
/// values with `(W, H)` = `cfg.crop`.
pub fn preprocess(img: &RgbImage, mode: AspectMode, cfg: &ClipPreprocess) -> Vec<f32> {
    normalize(&fit(img, mode, cfg), cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_resize_is_identity() {
        let img = RgbImage {
            width: 2,
            height: 1,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        assert_eq!(resize_bicubic(&img, 2, 1), img);
    }

    #[test]
    fn pad_colour_is_int_of_mean_times_255() {
        assert_eq!(ClipPreprocess::square(224).pad_colour(), [122, 116, 104]);
    }

    #[test]
    fn long_side_is_truncated_not_rounded() {
        // 336 * 50 / 23 = 730.43 -> 730; 42 * 60 / 34 = 74.1 -> 74.
        assert_eq!(shortest_edge_size(23, 50, 336), (336, 730));
        assert_eq!(shortest_edge_size(60, 34, 42), (74, 42));
    }

    #[test]
    fn wide_pad_centres_vertically() {
        let img = RgbImage::filled(4, 1, [9, 9, 9]);
        let sq = expand_to_square(&img, [1, 2, 3]);
        assert_eq!((sq.width, sq.height), (4, 4));
        // (4 - 1) // 2 = row 1 holds the image.
        assert_eq!(&sq.data[0..3], &[1, 2, 3]);
        assert_eq!(&sq.data[12..15], &[9, 9, 9]);
    }

    /// A picture whose padded square would pass the pixel limit is shrunk first: the
    /// canvas stays within the limit, the picture keeps its aspect and its colour, and it
    /// sits centred on the pad colour.
    #[test]
    fn pad_shrinks_a_picture_too_elongated_to_square() {
        let img = RgbImage::filled(60_000, 6, [200, 10, 10]);
        let small = within_square_limit(&img);
        assert_eq!((small.width, small.height), (10_000, 1));
        assert!(small.data.chunks_exact(3).all(|p| p == [200, 10, 10]));
        let fine = RgbImage::filled(10_000, 6, [1, 2, 3]);
        assert!(matches!(
            within_square_limit(&fine),
            std::borrow::Cow::Borrowed(_)
        ));
        let cfg = ClipPreprocess::square(28);
        let out = fit(&img, AspectMode::Pad, &cfg);
        assert_eq!((out.width, out.height), (28, 28));
        let row = |y: usize| &out.data[y * 28 * 3..(y + 1) * 28 * 3];
        assert!(row(0).chunks_exact(3).all(|p| p == cfg.pad_colour()));
        assert!(row(27).chunks_exact(3).all(|p| p == cfg.pad_colour()));
    }

    #[test]
    fn not_an_image_is_a_decode_error() {
        let err = decode(b"hello, not an image", "notes.txt").unwrap_err();
        assert!(matches!(err, ImageError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("notes.txt"));
    }

    #[test]
    fn truncated_jpeg_is_an_error_not_grey_rows() {
        let bytes = std::fs::read(kollava_testkit::fixtures_dir().join("images/photo.jpg"))
            .expect("fixture photo.jpg");
        assert!(decode(&bytes, "photo.jpg").is_ok());
        let err = decode(&bytes[..bytes.len() / 2], "cut.jpg").unwrap_err();
        assert!(matches!(err, ImageError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn fit_gives_crop_size_for_any_shape(w in 1u32..300, h in 1u32..300, mode in 0..3u8) {
            let img = RgbImage::filled(w, h, [10, 20, 30]);
            let mode = [AspectMode::Crop, AspectMode::Pad, AspectMode::Resize][mode as usize];
            let cfg = ClipPreprocess::square(28);
            let out = fit(&img, mode, &cfg);
            proptest::prop_assert_eq!((out.width, out.height), (28, 28));
            proptest::prop_assert_eq!(out.data.len(), 28 * 28 * 3);
        }

        #[test]
        fn resizing_a_flat_image_keeps_its_colour(w in 1u32..80, h in 1u32..80, ow in 1u32..80, oh in 1u32..80) {
            let img = RgbImage::filled(w, h, [200, 7, 128]);
            let out = resize_bicubic(&img, ow, oh);
            proptest::prop_assert!(out.data.chunks_exact(3).all(|p| p == [200, 7, 128]));
        }
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    /// A few-colour image, so GIF's palette keeps every colour exactly.
    fn sample() -> image::RgbImage {
        image::RgbImage::from_fn(17, 11, |x, y| {
            let c = [[200, 30, 40], [10, 220, 90], [0, 0, 255], [250, 250, 250]]
                [((x / 4 + y / 3) % 4) as usize];
            image::Rgb(c)
        })
    }

    fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut buf, format)
            .unwrap();
        buf.into_inner()
    }

    #[test]
    fn bmp_gif_webp_and_png_decode_to_the_same_rgb() {
        let img = sample();
        for format in [
            image::ImageFormat::Png,
            image::ImageFormat::Bmp,
            image::ImageFormat::Gif,
            image::ImageFormat::WebP,
        ] {
            let bytes = encode(&img, format);
            let got = decode(&bytes, &format!("{format:?}")).unwrap();
            assert_eq!((got.width, got.height), (17, 11), "{format:?}");
            assert_eq!(got.data, img.as_raw().as_slice(), "{format:?}");
        }
    }

    #[test]
    fn palette_and_grey_alpha_convert_like_pillow() {
        // LumaA: grey copied to three channels, alpha dropped (not composited).
        let la = image::DynamicImage::ImageLumaA8(
            image::ImageBuffer::from_raw(2, 1, vec![10, 0, 200, 255]).unwrap(),
        );
        let mut buf = std::io::Cursor::new(Vec::new());
        la.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        let got = decode(buf.get_ref(), "la.png").unwrap();
        assert_eq!(got.data, vec![10, 10, 10, 200, 200, 200]);
    }
}
