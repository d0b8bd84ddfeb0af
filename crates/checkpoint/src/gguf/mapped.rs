//! GGUF tensors read in place from a memory map instead of copied into the heap.
//!
//! A GGUF language model's tensor data is the blocks the kernels multiply, so its matrices
//! can be views of the mapped file: loading copies nothing, the pages belong to the page
//! cache (shared between processes and not a second copy beside the cached file), and the
//! kernel maps them in 64 KiB at a time as the first forward touches them. candle's
//! [`QTensor`] takes any storage that implements [`QuantizedType`]; [`Blocks`] is one over
//! the map, handing every product to candle's kernels on the mapped slice, exactly as for
//! candle's own `Vec` of blocks.

use std::sync::Arc;

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Result, Shape};
use half::{bf16, f16};
use memmap2::Mmap;

/// `len` bytes of a mapped file from `offset`, read as blocks of `T`.
struct Blocks<T> {
    map: Arc<Mmap>,
    offset: usize,
    blocks: usize,
    _type: std::marker::PhantomData<T>,
}

impl<T: GgmlType> Blocks<T> {
    fn slice(&self) -> &[T] {
        // SAFETY: `tensor` checked that the range lies inside the map and that its start is
        // aligned for `T` (plain-old-data blocks of bytes and halves, valid for any bits);
        // the map lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.offset) as *const T, self.blocks)
        }
    }
}

impl<T: GgmlType + 'static> QuantizedType for Blocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        k_quants::matmul(mkn, lhs, self.slice(), dst)
    }

    fn matmul_t_f16(&self, mkn: (usize, usize, usize), lhs: &[f16], dst: &mut [f16]) -> Result<()> {
        k_quants::matmul_f16(mkn, lhs, self.slice(), dst)
    }

    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
        if !hidden.is_multiple_of(T::BLCK_SIZE) || self.blocks != rows * (hidden / T::BLCK_SIZE) {
            candle_core::bail!("mapped {:?} table is not {rows} rows of {hidden}", T::DTYPE);
        }
        let row_blocks = hidden / T::BLCK_SIZE;
        let mut out = vec![0f32; ids.len() * hidden];
        for (dst, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            let row = id as usize;
            if row >= rows {
                candle_core::bail!("embedding id {row} is out of range for {rows} rows");
            }
            T::to_float(&self.slice()[row * row_blocks..(row + 1) * row_blocks], dst);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        let mut ys = vec![0f32; elem_count];
        T::to_float(self.slice(), &mut ys);
        Ok(CpuStorage::F32(ys))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.blocks * std::mem::size_of::<T>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.slice().as_ptr() as *const u8
    }

    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }

    fn from_float(&mut self, _: &[f32]) {
        // candle quantizes into storage it allocates itself, never into an existing one.
        unreachable!("a memory-mapped GGUF tensor is read-only");
    }

    fn from_float_imatrix(&mut self, _: &[f32], _: &[f32], _: usize) {
        unreachable!("a memory-mapped GGUF tensor is read-only");
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

fn boxed<T: GgmlType + 'static>(
    map: &Arc<Mmap>,
    offset: usize,
    elems: usize,
) -> Result<Box<dyn QuantizedType>> {
    let blocks = elems / T::BLCK_SIZE;
    let bytes = blocks * std::mem::size_of::<T>();
    if offset.checked_add(bytes).is_none_or(|end| end > map.len()) {
        candle_core::bail!("{bytes} bytes at offset {offset} run past the end of the file");
    }
    if !(map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>()) {
        candle_core::bail!(
            "the tensor at offset {offset} is not aligned for {:?}",
            T::DTYPE
        );
    }
    Ok(Box::new(Blocks::<T> {
        map: map.clone(),
        offset,
        blocks,
        _type: std::marker::PhantomData,
    }))
}

/// The tensor of `dtype` and `shape` whose data starts `offset` bytes into `map`.
pub fn tensor(map: &Arc<Mmap>, offset: usize, dtype: GgmlDType, shape: Shape) -> Result<QTensor> {
    use k_quants::*;
    let elems = shape.elem_count();
    if !elems.is_multiple_of(dtype.block_size()) {
        candle_core::bail!(
            "{elems} values are not whole {dtype:?} blocks of {}",
            dtype.block_size()
        );
    }
    let storage = match dtype {
        GgmlDType::F32 => boxed::<f32>(map, offset, elems),
        GgmlDType::F16 => boxed::<f16>(map, offset, elems),
        GgmlDType::BF16 => boxed::<bf16>(map, offset, elems),
        GgmlDType::Q4_0 => boxed::<BlockQ4_0>(map, offset, elems),
        GgmlDType::Q4_1 => boxed::<BlockQ4_1>(map, offset, elems),
        GgmlDType::Q5_0 => boxed::<BlockQ5_0>(map, offset, elems),
        GgmlDType::Q5_1 => boxed::<BlockQ5_1>(map, offset, elems),
        GgmlDType::Q8_0 => boxed::<BlockQ8_0>(map, offset, elems),
        GgmlDType::Q8_1 => boxed::<BlockQ8_1>(map, offset, elems),
        GgmlDType::Q2K => boxed::<BlockQ2K>(map, offset, elems),
        GgmlDType::Q3K => boxed::<BlockQ3K>(map, offset, elems),
        GgmlDType::Q4K => boxed::<BlockQ4K>(map, offset, elems),
        GgmlDType::Q5K => boxed::<BlockQ5K>(map, offset, elems),
        GgmlDType::Q6K => boxed::<BlockQ6K>(map, offset, elems),
        GgmlDType::Q8K => boxed::<BlockQ8K>(map, offset, elems),
    }?;
    QTensor::new(QStorage::Cpu(storage), shape)
}
