//! TensorBoard event files (`--report-to tensorboard`), written without TensorFlow: a
//! TFRecord stream of `Event` protobufs, each scalar a `Summary.Value{tag, simple_value}`.
//!
//! TFRecord framing: `u64 length`, `u32 masked_crc32c(length)`, the bytes,
//! `u32 masked_crc32c(bytes)`, little-endian; CRC-32C (Castagnoli) masked as
//! `((crc >> 15) | (crc << 17)) + 0xa282ead8`.

use std::io::Write;
use std::path::{Path, PathBuf};

fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event{wall_time, step, file_version | summary}`.
fn event(wall_time: f64, step: i64, body: &dyn Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    varint((1 << 3) | 1, &mut e); // wall_time: double
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut e); // step: int64
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

fn scalar_summary(tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::new();
    bytes_field(1, tag.as_bytes(), &mut v); // Value.tag
    varint((2 << 3) | 5, &mut v); // Value.simple_value: float
    v.extend_from_slice(&value.to_le_bytes());
    let mut s = Vec::new();
    bytes_field(1, &v, &mut s); // Summary.value
    s
}

/// Appends scalars to one event file; each record is flushed as written, so a killed run
/// leaves whole records.
pub struct EventWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<time>.<host>` with the version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "kollava".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now.as_secs()));
        let file = std::fs::File::create(&path)?;
        let mut w = Self { file, path };
        let version = event(now.as_secs_f64(), 0, &|e| {
            bytes_field(3, b"brain.Event:2", e)
        });
        w.record(&version)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf)
    }

    /// One scalar (`train/loss`, `train/learning_rate`, …) at `step`.
    pub fn scalar(&mut self, tag: &str, value: f64, step: usize) -> std::io::Result<()> {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let summary = scalar_summary(tag, value as f32);
        let e = event(wall, step as i64, &|e| bytes_field(5, &summary, e));
        self.record(&e)
    }
}

/// Reads back the records of an event file, checking both CRCs (for tests and tools).
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let take = |from: usize, n: usize| {
            data.get(from..from + n)
                .ok_or_else(|| format!("truncated record at byte {from}"))
        };
        let len_bytes = take(at, 8)?;
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(take(at + 8, 4)?.try_into().unwrap_or_default());
        if crc != masked_crc(len_bytes) {
            return Err(format!("bad length checksum at byte {at}"));
        }
        let body = take(at + 12, len)?;
        let crc = u32::from_le_bytes(take(at + 12 + len, 4)?.try_into().unwrap_or_default());
        if crc != masked_crc(body) {
            return Err(format!("bad data checksum at byte {at}"));
        }
        out.push(body.to_vec());
        at += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn scalars_are_framed_records_with_tag_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 1.5, 7).unwrap();
        let records = read_records(&w.path).unwrap();
        assert_eq!(records.len(), 2);
        assert!(records[0].windows(13).any(|s| s == b"brain.Event:2"));
        let r = &records[1];
        assert!(r.windows(10).any(|s| s == b"train/loss"));
        assert!(r.windows(4).any(|s| s == 1.5f32.to_le_bytes()));
        // step 7 as field 2 varint: 0x10 0x07
        assert!(r.windows(2).any(|s| s == [0x10, 0x07]));
    }
}
