//! Data-parallel training across processes, torchrun-style: every process (rank) trains on
//! its share of each step's samples, then the gradients are averaged so that all ranks
//! take the same optimizer step. Ranks find each other through `MASTER_ADDR` and
//! `MASTER_PORT`; `RANK` and `WORLD_SIZE` say who is who.
//!
//! The averaging here goes over TCP (rank 0 sums and sends back), which serves CPU runs and
//! several machines alike; it is the one place a GPU build would swap in NCCL.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// This process's place in a data-parallel run.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    /// Rank 0: one stream per other rank, in rank order. Others: the stream to rank 0.
    peers: Vec<TcpStream>,
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
                        });
                    }
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }

    /// Replaces `data` on every rank by its mean over the ranks (same length everywhere).
    pub fn all_reduce_mean(&mut self, data: &mut [f32]) -> std::io::Result<()> {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut buf = vec![0u8; data.len() * 4];
        if self.rank == 0 {
            let mut sum: Vec<f64> = data.iter().map(|&x| x as f64).collect();
            for s in &mut self.peers {
                s.read_exact(&mut buf)?;
                for (acc, c) in sum.iter_mut().zip(buf.chunks_exact(4)) {
                    *acc += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
                }
            }
            for (d, s) in data.iter_mut().zip(&sum) {
                *d = (*s / self.world as f64) as f32;
            }
            let out = bytes(data);
            for s in &mut self.peers {
                s.write_all(&out)?;
            }
        } else {
            let s = &mut self.peers[0];
            s.write_all(&bytes(data))?;
            s.read_exact(&mut buf)?;
            for (d, c) in data.iter_mut().zip(buf.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
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
}
