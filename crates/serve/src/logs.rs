//! The chat page's conversation and vote logs (llava-spec §7.3), kept as the reference keeps
//! them: one JSON line per event in `DIR/YYYY-MM-DD-conv.json` (`chat` after each answer,
//! `upvote`/`downvote`/`flag` from the buttons), and each image saved once under
//! `DIR/images/<sha256>.<ext>`, the lines referring to it by that path. Only with
//! `serve --log-dir`; API traffic is never logged.

use std::io::Write;
use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;

use crate::error::ApiError;
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct LogRequest {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Value>,
    #[serde(default)]
    params: Option<Value>,
}

/// `days` since 1970-01-01 → `(year, month, day)` (proleptic Gregorian).
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Saves a data-URL image under `dir/images/` by content hash; returns its relative path.
fn save_image(dir: &Path, url: &str) -> Result<String, ApiError> {
    let (meta, data) = url
        .strip_prefix("data:")
        .and_then(|r| r.split_once(','))
        .ok_or_else(|| ApiError::bad_request("images in logs must be data URLs"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad_request(format!("image: invalid base64 ({e})")))?;
    let ext = match meta.split(';').next().unwrap_or("") {
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        _ => "png",
    };
    let hash = hex(&sha2::Sha256::digest(&bytes));
    let rel = format!("images/{hash}.{ext}");
    let path = dir.join(&rel);
    if !path.exists() {
        let images = dir.join("images");
        std::fs::create_dir_all(&images).map_err(ApiError::internal)?;
        let tmp = images.join(format!(".{hash}.tmp"));
        std::fs::write(&tmp, &bytes).map_err(ApiError::internal)?;
        std::fs::rename(&tmp, &path).map_err(ApiError::internal)?;
    }
    Ok(rel)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /api/log`.
pub async fn log_event(
    State(state): State<AppState>,
    Json(req): Json<LogRequest>,
) -> Result<Json<Value>, ApiError> {
    let Some(dir) = state.log_dir.clone() else {
        return Ok(Json(json!({"logged": false})));
    };
    if !matches!(req.kind.as_str(), "chat" | "upvote" | "downvote" | "flag") {
        return Err(ApiError::bad_request(format!(
            "unknown log type {:?} (chat, upvote, downvote, flag)",
            req.kind
        )));
    }
    tokio::task::spawn_blocking(move || write_event(&dir, req))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(json!({"logged": true})))
}

fn write_event(dir: &PathBuf, req: LogRequest) -> Result<(), ApiError> {
    std::fs::create_dir_all(dir).map_err(ApiError::internal)?;
    let mut messages = req.messages;
    for m in &mut messages {
        if let Some(parts) = m.get_mut("content").and_then(Value::as_array_mut) {
            for p in parts {
                if let Some(url) = p["image_url"]["url"].as_str().map(str::to_string) {
                    p["image_url"]["url"] = json!(save_image(dir, &url)?);
                }
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (y, mo, d) = civil_date((now.as_secs() / 86_400) as i64);
    let line = json!({
        "tstamp": now.as_secs_f64(), "type": req.kind, "model": req.model,
        "messages": messages, "params": req.params,
    });
    let path = dir.join(format!("{y:04}-{mo:02}-{d:02}-conv.json"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(ApiError::internal)?;
    // One write per line, so concurrent events never interleave within a line.
    f.write_all(format!("{line}\n").as_bytes())
        .map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(19_723), (2024, 1, 1));
        assert_eq!(civil_date(20_416), (2025, 11, 24));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
    }
}
