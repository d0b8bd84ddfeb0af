//! The GGUF container (v3), written by streaming: every tensor's size follows from its shape
//! and type, so the header with all offsets goes out first and the tensors follow one at a
//! time, and a 7B model never has to be in memory at once. Reading goes through candle's
//! parser ([`candle_core::quantized::gguf_file`]).
//!
//! Layout: magic `GGUF`, version, tensor count, metadata count; the key/value pairs; one
//! info per tensor (name, dims innermost first, type, offset into the data section); padding
//! to the alignment; the tensor data, each padded to the alignment.

use std::io::Write;

use candle_core::quantized::GgmlDType;

/// Data offsets are multiples of this (GGUF's default `general.alignment`).
pub const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrF32(Vec<f32>),
    ArrI32(Vec<i32>),
    ArrU32(Vec<u32>),
}

/// GGUF's numbering of `ggml_type`s.
pub fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Bytes of a tensor of `elems` elements of type `t`.
pub fn byte_size(t: GgmlDType, elems: usize) -> u64 {
    (elems / t.block_size() * t.type_size()) as u64
}

/// One tensor's entry in the header. `shape` is row-major (outermost first), as candle's.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_meta(w: &mut impl Write, v: &Meta) -> std::io::Result<()> {
    let ty = |w: &mut dyn Write, t: u32| w.write_all(&t.to_le_bytes());
    let arr = |w: &mut dyn Write, t: u32, n: usize| -> std::io::Result<()> {
        w.write_all(&9u32.to_le_bytes())?;
        w.write_all(&t.to_le_bytes())?;
        w.write_all(&(n as u64).to_le_bytes())
    };
    match v {
        Meta::U32(x) => {
            ty(w, 4)?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::I32(x) => {
            ty(w, 5)?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::F32(x) => {
            ty(w, 6)?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::Bool(x) => {
            ty(w, 7)?;
            w.write_all(&[u8::from(*x)])
        }
        Meta::Str(s) => {
            ty(w, 8)?;
            put_str(w, s)
        }
        Meta::ArrStr(xs) => {
            arr(w, 8, xs.len())?;
            xs.iter().try_for_each(|s| put_str(w, s))
        }
        Meta::ArrF32(xs) => {
            arr(w, 6, xs.len())?;
            xs.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Meta::ArrI32(xs) => {
            arr(w, 5, xs.len())?;
            xs.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Meta::ArrU32(xs) => {
            arr(w, 4, xs.len())?;
            xs.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

/// A GGUF file being written: the header at creation, then [`GgufWriter::tensor`] once per
/// entry, in order.
pub struct GgufWriter<W: Write> {
    w: W,
    entries: Vec<TensorEntry>,
    next: usize,
}

impl<W: Write> GgufWriter<W> {
    pub fn new(
        mut w: W,
        meta: &[(String, Meta)],
        entries: Vec<TensorEntry>,
    ) -> std::io::Result<Self> {
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            put_str(&mut head, k)?;
            put_meta(&mut head, v)?;
        }
        let mut offset = 0u64;
        for e in &entries {
            put_str(&mut head, &e.name)?;
            head.extend_from_slice(&(e.shape.len() as u32).to_le_bytes());
            for &d in e.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&type_id(e.dtype).to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += byte_size(e.dtype, e.shape.iter().product()).next_multiple_of(ALIGNMENT);
        }
        let pad = (head.len() as u64).next_multiple_of(ALIGNMENT) - head.len() as u64;
        head.resize(head.len() + pad as usize, 0);
        w.write_all(&head)?;
        Ok(Self {
            w,
            entries,
            next: 0,
        })
    }

    /// Writes the data of the next entry; `data` must be exactly its size.
    pub fn tensor(&mut self, data: &[u8]) -> std::io::Result<()> {
        let e = self.entries.get(self.next).ok_or_else(|| {
            std::io::Error::other("more tensors written than the header announced")
        })?;
        let size = byte_size(e.dtype, e.shape.iter().product());
        if data.len() as u64 != size {
            return Err(std::io::Error::other(format!(
                "tensor {} has {} bytes, the header announced {size}",
                e.name,
                data.len()
            )));
        }
        self.w.write_all(data)?;
        let pad = size.next_multiple_of(ALIGNMENT) - size;
        self.w.write_all(&vec![0u8; pad as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Checks every announced tensor was written and returns the sink.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.next != self.entries.len() {
            return Err(std::io::Error::other(format!(
                "{} of {} tensors written",
                self.next,
                self.entries.len()
            )));
        }
        self.w.flush()?;
        Ok(self.w)
    }
}
