//! Data-parallel training across processes, torchrun-style: every process (rank) trains on
//! its share of each step's samples, then the gradients are averaged so that all ranks
//! take the same optimizer step. Ranks find each other through `MASTER_ADDR` and
//! `MASTER_PORT`; `RANK` and `WORLD_SIZE` say who is who.
//!
//! The averaging goes over TCP (rank 0 sums and sends back), which serves CPU runs and
//! several machines alike; a sharded run (`--shard grad-opt`) uses the same connections for
//! a reduce-scatter of the gradients and an all-gather of the updated parameters (on GPUs
//! too, through host memory, for now). A build with the `nccl` feature training on GPUs switches to
//! NCCL after the ranks have met over TCP ([`Dist::use_nccl`]): rank 0's NCCL id travels
//! over that connection, and each average is then one all-reduce between the GPUs.

use candle_core::Tensor;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// This process's place in a data-parallel run.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    /// Rank 0: one stream per other rank, in rank order. Others: the stream to rank 0.
    peers: Vec<TcpStream>,
    #[cfg(feature = "nccl")]
    nccl: Option<std::sync::Arc<nccl::Comm>>,
}

fn env_usize(name: &str) -> Result<Option<usize>, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(None),
    }
}

impl Dist {
    /// From `RANK`, `WORLD_SIZE`, `MASTER_ADDR` (default 127.0.0.1) and `MASTER_PORT`;
    /// `None` for a single process.
    pub fn from_env() -> Result<Option<Dist>, String> {
        let world = env_usize("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(None);
        }
        let rank = env_usize("RANK")?.ok_or("WORLD_SIZE is set but RANK is not")?;
        if rank >= world {
            return Err(format!("RANK {rank} is not below WORLD_SIZE {world}"));
        }
        let host = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = env_usize("MASTER_PORT")?.ok_or("WORLD_SIZE is set but MASTER_PORT is not")?;
        Dist::connect(
            rank,
            world,
            &format!("{host}:{port}"),
            Duration::from_secs(120),
        )
        .map(Some)
        .map_err(|e| format!("rank {rank} of {world} cannot reach {host}:{port}: {e}"))
    }

    /// Rank 0 listens on `addr` and waits for the others; they connect (retrying until
    /// `timeout`) and introduce themselves by rank.
    pub fn connect(
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
    ) -> std::io::Result<Dist> {
        let deadline = Instant::now() + timeout;
        if rank == 0 {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)?;
                        let mut b = [0u8; 4];
                        s.read_exact(&mut b)?;
                        let r = u32::from_le_bytes(b) as usize;
                        if r == 0 || r >= world || peers[r - 1].is_some() {
                            return Err(std::io::Error::other(format!("unexpected rank {r}")));
                        }
                        s.set_nodelay(true)?;
                        peers[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "not every rank connected",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Dist {
                rank,
                world,
                peers: peers.into_iter().flatten().collect(),
                #[cfg(feature = "nccl")]
                nccl: None,
            })
        } else {
            loop {
                match TcpStream::connect(addr) {
                    Ok(mut s) => {
                        s.set_nodelay(true)?;
                        s.write_all(&(rank as u32).to_le_bytes())?;
                        return Ok(Dist {
                            rank,
                            world,
                            peers: vec![s],
                            #[cfg(feature = "nccl")]
                            nccl: None,
                        });
                    }
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }

    /// `t` (f32, the same shape on every rank) averaged over the ranks: by NCCL on the GPU
    /// once [`Dist::use_nccl`] has run, otherwise over TCP through host memory.
    pub fn all_reduce_mean_tensor(&mut self, t: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "nccl")]
        if let (Some(comm), true) = (&self.nccl, t.device().is_cuda()) {
            return t
                .contiguous()?
                .apply_op1_no_bwd(&nccl::AllReduceMean(comm.clone()));
        }
        let mut flat = t.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce_mean(&mut flat)
            .map_err(|e| candle_core::Error::Msg(format!("averaging with the other ranks: {e}")))?;
        Tensor::from_vec(flat, t.shape(), t.device())
    }

    /// Averages through NCCL from now on, between the GPUs of the ranks (`device` is this
    /// rank's): rank 0 makes the NCCL id and sends it to the others over TCP.
    #[cfg(feature = "nccl")]
    pub fn use_nccl(&mut self, device: &candle_core::Device) -> Result<(), String> {
        use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
        let candle_core::Device::Cuda(dev) = device else {
            return Err("NCCL averages between GPUs; this rank trains on the CPU".into());
        };
        let io = |e: std::io::Error| format!("sending the NCCL id: {e}");
        let id = if self.rank == 0 {
            let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            for s in &mut self.peers {
                s.write_all(&bytes).map_err(io)?;
            }
            id
        } else {
            let mut b = [0u8; 128];
            self.peers[0].read_exact(&mut b).map_err(io)?;
            Id::uninit(b.map(|c| c as std::ffi::c_char))
        };
        let comm = Comm::from_rank(dev.cuda_stream(), self.rank, self.world, id).map_err(|e| {
            format!(
                "ncclCommInitRank (rank {} of {}): {e:?}",
                self.rank, self.world
            )
        })?;
        self.nccl = Some(std::sync::Arc::new(nccl::Comm(comm)));
        Ok(())
    }

    /// The first half of a reduction: every rank sends `data` (the same length everywhere)
    /// to rank 0, which adds them up in rank order in f64 and gets the mean; the others get
    /// `None` and wait for their share of it. Rank 0 reads the ranks a chunk at a time, in
    /// turn, so that it holds the sums of one chunk, not of the whole vector.
    fn mean_at_root(&mut self, data: &[f32]) -> std::io::Result<Option<Vec<f32>>> {
        if self.rank != 0 {
            write_f32s(&mut self.peers[0], data)?;
            return Ok(None);
        }
        let mut mean = vec![0f32; data.len()];
        let mut sum = vec![0f64; CHUNK.min(data.len())];
        let mut part = vec![0f32; CHUNK.min(data.len())];
        for (at, own) in (0..).step_by(CHUNK).zip(data.chunks(CHUNK)) {
            let n = own.len();
            for (acc, &x) in sum.iter_mut().zip(own) {
                *acc = x as f64;
            }
            for s in &mut self.peers {
                read_f32s(s, &mut part[..n])?;
                for (acc, &x) in sum.iter_mut().zip(&part[..n]) {
                    *acc += x as f64;
                }
            }
            for (m, acc) in mean[at..at + n].iter_mut().zip(&sum) {
                *m = (*acc / self.world as f64) as f32;
            }
        }
        Ok(Some(mean))
    }

    /// Reads `n` floats from rank 0.
    fn read_from_root(&mut self, n: usize) -> std::io::Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        read_f32s(&mut self.peers[0], &mut out)?;
        Ok(out)
    }

    /// The mean over the ranks of `data` (the same length everywhere), of which this rank
    /// gets only `ranges[rank]`: a reduce-scatter. The sums are [`Dist::all_reduce_mean`]'s,
    /// so each slice holds the very numbers an all-reduce would.
    pub fn reduce_scatter_mean(
        &mut self,
        data: &[f32],
        ranges: &[std::ops::Range<usize>],
    ) -> std::io::Result<Vec<f32>> {
        match self.mean_at_root(data)? {
            Some(mean) => {
                for (s, r) in self.peers.iter_mut().zip(&ranges[1..]) {
                    write_f32s(s, &mean[r.clone()])?;
                }
                Ok(mean[ranges[0].clone()].to_vec())
            }
            None => self.read_from_root(ranges[self.rank].len()),
        }
    }

    /// Every rank's `mine` (`ranges[rank]` of a vector) put together on rank 0 only (the
    /// others get `None`): what a checkpoint that rank 0 writes needs.
    pub fn gather_at_root(
        &mut self,
        mine: &[f32],
        ranges: &[std::ops::Range<usize>],
    ) -> std::io::Result<Option<Vec<f32>>> {
        if self.rank != 0 {
            write_f32s(&mut self.peers[0], mine)?;
            return Ok(None);
        }
        let mut all = vec![0f32; ranges.last().map_or(0, |r| r.end)];
        all[ranges[0].clone()].copy_from_slice(mine);
        for (s, r) in self.peers.iter_mut().zip(&ranges[1..]) {
            read_f32s(s, &mut all[r.clone()])?;
        }
        Ok(Some(all))
    }

    /// Every rank's `mine` (`ranges[rank]` of a vector) put together, on every rank: an
    /// all-gather.
    pub fn all_gather(
        &mut self,
        mine: &[f32],
        ranges: &[std::ops::Range<usize>],
    ) -> std::io::Result<Vec<f32>> {
        let total = ranges.last().map_or(0, |r| r.end);
        if self.rank == 0 {
            let mut all = vec![0f32; total];
            all[ranges[0].clone()].copy_from_slice(mine);
            for (s, r) in self.peers.iter_mut().zip(&ranges[1..]) {
                read_f32s(s, &mut all[r.clone()])?;
            }
            for s in &mut self.peers {
                write_f32s(s, &all)?;
            }
            Ok(all)
        } else {
            write_f32s(&mut self.peers[0], mine)?;
            self.read_from_root(total)
        }
    }

    /// The sum of `x` over the ranks, added in rank order (the same number everywhere).
    pub fn all_reduce_sum_f64(&mut self, x: f64) -> std::io::Result<f64> {
        if self.rank == 0 {
            let mut sum = x;
            for s in &mut self.peers {
                let mut b = [0u8; 8];
                s.read_exact(&mut b)?;
                sum += f64::from_le_bytes(b);
            }
            for s in &mut self.peers {
                s.write_all(&sum.to_le_bytes())?;
            }
            Ok(sum)
        } else {
            let s = &mut self.peers[0];
            s.write_all(&x.to_le_bytes())?;
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            Ok(f64::from_le_bytes(b))
        }
    }

    /// Replaces `data` on every rank by its mean over the ranks (same length everywhere).
    pub fn all_reduce_mean(&mut self, data: &mut [f32]) -> std::io::Result<()> {
        match self.mean_at_root(data)? {
            Some(mean) => {
                for s in &mut self.peers {
                    write_f32s(s, &mean)?;
                }
                data.copy_from_slice(&mean);
            }
            None => read_f32s(&mut self.peers[0], data)?,
        }
        Ok(())
    }
}

/// Floats go over the wire little-endian, converted a chunk at a time (a whole vector's
/// bytes would be one more copy of it: hundreds of megabytes for a 7B model's head).
const CHUNK: usize = 1 << 16;

fn write_f32s(s: &mut TcpStream, v: &[f32]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4 * CHUNK.min(v.len()));
    for c in v.chunks(CHUNK) {
        buf.clear();
        buf.extend(c.iter().flat_map(|x| x.to_le_bytes()));
        s.write_all(&buf)?;
    }
    Ok(())
}

fn read_f32s(s: &mut TcpStream, out: &mut [f32]) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4 * CHUNK.min(out.len())];
    for c in out.chunks_mut(CHUNK) {
        let bytes = &mut buf[..4 * c.len()];
        s.read_exact(bytes)?;
        for (x, b) in c.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    Ok(())
}

/// The NCCL side (feature `nccl`).
#[cfg(feature = "nccl")]
mod nccl {
    use candle_core::cuda_backend::cudarc::nccl::safe::ReduceOp;
    use candle_core::{CpuStorage, CudaStorage, Layout, Shape};

    /// A communicator shared by this rank's training thread and its `Dist`.
    pub struct Comm(pub candle_core::cuda_backend::cudarc::nccl::safe::Comm);

    // SAFETY: NCCL allows a communicator to be used from any thread as long as the calls do
    // not overlap; `Dist` sits behind a mutex and the trainer averages from one thread.
    unsafe impl Send for Comm {}
    unsafe impl Sync for Comm {}

    /// `x` ↦ its mean over the ranks, one `ncclAllReduce(avg)` on this rank's stream.
    pub struct AllReduceMean(pub std::sync::Arc<Comm>);

    impl candle_core::CustomOp1 for AllReduceMean {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-mean"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL averages CUDA tensors; a CPU tensor goes over TCP")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL all-reduce: the tensor is not contiguous")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let mut dst = s.device.alloc_zeros::<f32>(end - start)?;
            self.0
                 .0
                .all_reduce(&src, &mut dst, &ReduceOp::Avg)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((
                CudaStorage::wrap_cuda_slice(dst, s.device.clone()),
                l.shape().clone(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_ranks_agree_on_the_mean() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut d = Dist::connect(rank, 3, &addr, Duration::from_secs(10)).unwrap();
                    let mut v = vec![rank as f32, 10.0 * rank as f32, 1.0];
                    d.all_reduce_mean(&mut v).unwrap();
                    d.all_reduce_mean(&mut v).unwrap(); // a mean of equal values stays put
                    v
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![1.0, 10.0, 1.0]);
        }
    }

    /// A reduce-scatter gives each rank its slice of the all-reduce's very numbers; an
    /// all-gather puts the slices back together on every rank; the f64 sum is the same
    /// everywhere.
    #[test]
    fn reduce_scatter_and_all_gather_agree_with_the_all_reduce() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let ranges = [0..3, 3..5, 5..7];
        let data = |rank: usize| -> Vec<f32> {
            (0..7)
                .map(|i| (i as f32 + 0.1) * (rank as f32 + 1.0).sqrt())
                .collect()
        };
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let (addr, ranges) = (addr.clone(), ranges.clone());
                std::thread::spawn(move || {
                    let mut d = Dist::connect(rank, 3, &addr, Duration::from_secs(10)).unwrap();
                    let mut all = data(rank);
                    d.all_reduce_mean(&mut all).unwrap();
                    let mine = d.reduce_scatter_mean(&data(rank), &ranges).unwrap();
                    assert_eq!(mine, all[ranges[rank].clone()]);
                    let back = d.all_gather(&mine, &ranges).unwrap();
                    assert_eq!(back, all);
                    d.all_reduce_sum_f64(rank as f64 + 0.5).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 4.5);
        }
    }
}
