//! The reference's training data (llava-spec §5.1): a JSON array, or JSON Lines, of
//! `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`. Records are
//! validated once, with the file and record named in errors.

use std::path::Path;

use kollava_inputs::template::Role;
use serde_json::Value;

/// One training record.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    /// Image file name relative to the image folder.
    pub image: Option<String>,
    /// Alternating turns, user first.
    pub turns: Vec<(Role, String)>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("cannot read {file}: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}: record {index}: {reason}")]
    Record {
        file: String,
        index: usize,
        reason: String,
    },
    #[error("{file} has no usable records")]
    Empty { file: String },
}

fn parse_record(v: &Value, file: &str, index: usize) -> Result<Sample, DataError> {
    let bad = |reason: String| DataError::Record {
        file: file.to_string(),
        index,
        reason,
    };
    let id = match &v["id"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => index.to_string(),
    };
    let image = match &v["image"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => return Err(bad(format!("\"image\" must be a string, found {other}"))),
    };
    let convs = v["conversations"]
        .as_array()
        .ok_or_else(|| bad("no \"conversations\" array".into()))?;
    let mut turns = Vec::with_capacity(convs.len());
    for (k, c) in convs.iter().enumerate() {
        let role = match c["from"].as_str() {
            Some("human") | Some("user") => Role::User,
            Some("gpt") | Some("assistant") => Role::Assistant,
            other => {
                return Err(bad(format!(
                    "conversations[{k}].from is {other:?}, expected \"human\" or \"gpt\""
                )))
            }
        };
        let value = c["value"]
            .as_str()
            .ok_or_else(|| bad(format!("conversations[{k}].value is not a string")))?;
        turns.push((role, value.to_string()));
    }
    // Upstream drops a leading gpt turn, then expects strict alternation.
    if turns.first().map(|t| t.0) == Some(Role::Assistant) {
        turns.remove(0);
    }
    for (k, (role, _)) in turns.iter().enumerate() {
        let want = if k % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if *role != want {
            return Err(bad(format!(
                "turn {k} should come from {}",
                if want == Role::User { "human" } else { "gpt" }
            )));
        }
    }
    if turns.len() < 2 {
        return Err(bad("needs at least one human and one gpt turn".into()));
    }
    Ok(Sample { id, image, turns })
}

/// Reads a JSON array or JSON Lines file of records.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>, DataError> {
    let samples = read_records(path)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    if samples.is_empty() {
        return Err(DataError::Empty {
            file: path.display().to_string(),
        });
    }
    Ok(samples)
}

/// Every record of the file, each parsed on its own (for `kollava data check`, which
/// reports all problems rather than the first). Fails only if the file is unreadable.
pub fn read_records(path: &Path) -> Result<Vec<Result<Sample, DataError>>, DataError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Read {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| DataError::Read {
            file: file.clone(),
            reason: format!("invalid JSON: {e}"),
        })?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| DataError::Record {
                    file: file.clone(),
                    index: i,
                    reason: format!("invalid JSON line: {e}"),
                })
            })
            .collect::<Result<_, _>>()?
    };
    Ok(values
        .iter()
        .enumerate()
        .map(|(i, v)| parse_record(v, &file, i))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_array_and_jsonl_read_the_same_and_a_leading_gpt_turn_is_dropped() {
        let dir = std::env::temp_dir().join(format!("kollava-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = r#"{"id": 7, "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image>\n무엇?"}, {"from": "gpt", "value": "원"}]}"#;
        std::fs::write(dir.join("a.json"), format!("[{rec}]")).unwrap();
        std::fs::write(dir.join("a.jsonl"), format!("{rec}\n")).unwrap();
        let a = read_samples(&dir.join("a.json")).unwrap();
        assert_eq!(a, read_samples(&dir.join("a.jsonl")).unwrap());
        assert_eq!(a[0].id, "7");
        assert_eq!(
            a[0].turns,
            vec![
                (Role::User, "<image>\n무엇?".to_string()),
                (Role::Assistant, "원".to_string())
            ]
        );
        std::fs::write(
            dir.join("bad.json"),
            r#"[{"conversations": [{"from": "robot", "value": "x"}]}]"#,
        )
        .unwrap();
        let err = read_samples(&dir.join("bad.json")).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("record 0") && err.contains("robot"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
