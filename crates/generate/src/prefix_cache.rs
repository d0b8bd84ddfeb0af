//! Reuse across requests and turns: [`PrefixCache`] keeps the keys and values of sequences
//! already computed, so a new prompt prefills only what follows its longest cached prefix
//! (a conversation's follow-up, many users of one system prompt, the same picture asked
//! about again); [`FeatureCache`] keeps projected image features, so the same picture in a
//! new conversation skips the vision tower.
//!
//! A sequence is identified position by position ([`PosKey`]): a text position by its token
//! id, an image position by the SHA-256 of the image's preprocessed pixels and the feature
//! row. The same picture sent again (another base64 string, another file) therefore
//! matches, and two pictures that differ in one pixel never do. Nothing else changes what a
//! position's keys and values are: the weights, dtype and projector are fixed for a loaded
//! session, positions are counted from the start, and the template is in the tokens.
//! Sampling settings never matter: the prompt's last positions are always prefilled
//! ([`crate::engine::FRESH_POSITIONS`]), so the first token is sampled from fresh logits.
//!
//! The store is a tree of fixed-size blocks of positions ([`PrefixCache::BLOCK`]): a
//! block's identity is its parent block and its own keys, compared exactly (no hash stands
//! in for a key). A stored sequence's last block may be partial, and a lookup may use the
//! first positions of any block, so a follow-up reuses exactly the positions it shares
//! with what came before. When the store passes its byte budget, the
//! least recently used leaf blocks go first (a block is used when a lookup passes through
//! it), so shared prefixes such as a system prompt outlive the conversations under them.
//! A request copies the rows it reuses into its own cache (the batch's contiguous
//! buffers, which the decode kernels read); until then it holds the blocks by reference,
//! so an eviction meanwhile frees nothing it is using.
//!
//! Exactness: every stored row is a prefill's (an answer is prefilled once more after it
//! ends, see [`crate::Batch::store_answers`]), every stored step was at least the model's
//! [`steady_rows`](kollava_model::decoder::Decoder::steady_rows) long, and what reuses
//! rows prefills at least that many, so the kernels that compute a prompt's rows do not
//! depend on how it was cut into steps (with a `Q4_K`/`Q6_K` model on a CPU with AVX512,
//! every prefill step goes to the bf16 GEMM, see `kquant::max_rows`). Bit for bit the
//! logits of a cold prefill of the whole prompt: f32, f16 and bf16 models on CPU (with a
//! 16-bit cache, every step attends the stored values) and GGUF models, tested on every
//! family and on k-quant matrices.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use sha2::Digest;

/// What one position of a sequence holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PosKey {
    Token(u32),
    /// Row `row` of the features of the image whose preprocessed pixels hash to `image`.
    Image {
        image: [u8; 32],
        row: u32,
    },
}

/// The SHA-256 of an image's preprocessed pixels (values and shape), which identifies it
/// for both caches.
pub fn image_digest(pixels: &[f32], shape: (usize, usize)) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update((shape.0 as u64).to_le_bytes());
    h.update((shape.1 as u64).to_le_bytes());
    let bytes: Vec<u8> = pixels.iter().flat_map(|x| x.to_le_bytes()).collect();
    h.update(&bytes);
    h.finalize().into()
}

/// A default budget from the memory free now (after the model is loaded): an eighth of it,
/// between 64 MiB and 4 GiB (512 MiB where the free memory cannot be read).
pub fn default_budget_bytes() -> usize {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kb| kb * 1024)
    });
    match available {
        Some(bytes) => (bytes / 8).clamp(64 << 20, 4 << 30),
        None => 512 << 20,
    }
}

/// Per layer, the keys and values `(1, kv_heads, len, d)` of some positions.
pub type LayerRows = Vec<(Tensor, Tensor)>;

/// Figures for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that reused at least one position, and those that reused none.
    pub hits: u64,
    pub misses: u64,
    /// Positions reused (not prefilled) over all lookups.
    pub tokens_reused: u64,
    /// Bytes held and entries (blocks or images) held now.
    pub bytes: usize,
    pub entries: usize,
    /// Entries dropped to stay under the budget.
    pub evictions: u64,
    pub budget: usize,
}

/// A prefix found in the store: `tokens` positions, as pieces of per-layer rows.
pub struct Reuse {
    pub tokens: usize,
    /// Each block on the path and how many of its positions are used (all but maybe the
    /// last's).
    pieces: Vec<(Arc<LayerRows>, usize)>,
}

impl Reuse {
    /// Per layer, the pieces that make up the prefix (for
    /// [`kollava_model::KvCache::load_prefix`]).
    pub fn layers(&self) -> Result<Vec<LayerRows>> {
        let layers = self.pieces.first().map_or(0, |(b, _)| b.len());
        (0..layers)
            .map(|l| {
                self.pieces
                    .iter()
                    .map(|(block, used)| {
                        let (k, v) = &block[l];
                        match k.dim(2)? {
                            n if n == *used => Ok((k.clone(), v.clone())),
                            _ => Ok((k.narrow(2, 0, *used)?, v.narrow(2, 0, *used)?)),
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// Keys and values of computed sequences, by prefix (see the module doc).
pub struct PrefixCache {
    budget: usize,
    inner: Mutex<Tree>,
}

/// The root's id: the parent of every first block.
const ROOT: u64 = 0;

#[derive(Default)]
struct Tree {
    nodes: HashMap<u64, Node>,
    /// `(parent, the block's keys)` → the block.
    children: HashMap<(u64, Vec<PosKey>), u64>,
    /// Each node's children (the root's too), for matching part of a block.
    kids: HashMap<u64, Vec<u64>>,
    /// Blocks with no children, by last use: the eviction order.
    leaves: BTreeSet<(u64, u64)>,
    next_id: u64,
    clock: u64,
    stats: CacheStats,
}

/// A block: [`PrefixCache::BLOCK`] positions, or fewer at the end of a stored sequence
/// (such a block never has children).
struct Node {
    parent: u64,
    keys: Vec<PosKey>,
    rows: Arc<LayerRows>,
    bytes: usize,
    used: u64,
}

impl PrefixCache {
    /// Positions per block: the granularity of sharing and eviction. Small enough that the
    /// store rarely holds the same positions twice (a sequence's last, partial block is
    /// stored too, and a later one may match part of any block), large enough that a 7B
    /// prompt is a few dozen blocks.
    pub const BLOCK: usize = 16;

    /// A store holding at most `budget` bytes of keys and values (0: off).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Tree {
                next_id: ROOT + 1,
                ..Default::default()
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    fn tree(&self) -> std::sync::MutexGuard<'_, Tree> {
        // A panic elsewhere while holding the lock leaves a consistent tree (every change
        // is completed before the next can fail): keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            budget: self.budget,
            ..self.tree().stats
        }
    }

    /// The longest stored prefix of `keys`, at most `limit` positions; marks its blocks
    /// used. Counted as a hit or a miss.
    pub fn lookup(&self, keys: &[PosKey], limit: usize) -> Reuse {
        self.search(keys, limit, true)
    }

    /// [`PrefixCache::lookup`] for the store's own use (storing an answer after its
    /// prompt), not counted as a hit or a miss.
    pub fn find(&self, keys: &[PosKey], limit: usize) -> Reuse {
        self.search(keys, limit, false)
    }

    fn search(&self, keys: &[PosKey], limit: usize, count: bool) -> Reuse {
        let mut reuse = Reuse {
            tokens: 0,
            pieces: Vec::new(),
        };
        if !self.enabled() {
            return reuse;
        }
        let mut guard = self.tree();
        let tree = &mut *guard;
        let limit = limit.min(keys.len());
        let path = tree.path(keys, limit);
        let mut at = path.len() * Self::BLOCK;
        let mut used: Vec<(u64, usize)> = path.iter().map(|&id| (id, Self::BLOCK)).collect();
        // Then the child of the last block that shares the most of what follows.
        let parent = path.last().copied().unwrap_or(ROOT);
        let rest = &keys[at..limit];
        let best = tree.kids.get(&parent).and_then(|kids| {
            kids.iter()
                .map(|&id| {
                    let k = &tree.nodes[&id].keys;
                    (id, k.iter().zip(rest).take_while(|(a, b)| a == b).count())
                })
                .max_by_key(|&(_, n)| n)
        });
        if let Some((id, n)) = best.filter(|&(_, n)| n > 0) {
            used.push((id, n));
            at += n;
        }
        tree.clock += 1;
        let now = tree.clock;
        for &(id, n) in &used {
            tree.touch(id, now);
            reuse.pieces.push((tree.nodes[&id].rows.clone(), n));
        }
        reuse.tokens = at;
        if count && at > 0 {
            tree.stats.hits += 1;
            tree.stats.tokens_reused += at as u64;
        } else if count {
            tree.stats.misses += 1;
        }
        reuse
    }

    /// Stores the blocks of `keys` that are not stored yet, the last partial one included;
    /// `rows(range)` gives the keys and values of the positions `range` (a block at a
    /// time). Then evicts down to the budget.
    pub fn insert(
        &self,
        keys: &[PosKey],
        mut rows: impl FnMut(std::ops::Range<usize>) -> Result<LayerRows>,
    ) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let mut guard = self.tree();
        let tree = &mut *guard;
        let path = tree.path(keys, keys.len());
        let mut parent = path.last().copied().unwrap_or(ROOT);
        tree.clock += 1;
        let now = tree.clock;
        for start in (path.len() * Self::BLOCK..keys.len()).step_by(Self::BLOCK) {
            let range = start..keys.len().min(start + Self::BLOCK);
            if let Some(&id) = tree.children.get(&(parent, keys[range.clone()].to_vec())) {
                // The same partial block, stored before.
                tree.touch(id, now);
                break;
            }
            let block = rows(range.clone())?;
            parent = tree.add(parent, keys[range].to_vec(), block, now);
        }
        while tree.stats.bytes > self.budget {
            if !tree.evict_one() {
                break;
            }
        }
        tree.stats.entries = tree.nodes.len();
        Ok(())
    }
}

impl Tree {
    /// The stored whole blocks matching `keys` from the start, covering at most `limit`
    /// positions.
    fn path(&self, keys: &[PosKey], limit: usize) -> Vec<u64> {
        let mut path = Vec::new();
        let mut parent = ROOT;
        for block in keys[..limit].chunks_exact(PrefixCache::BLOCK) {
            // The lookup key is built per block; a block is 16 positions.
            match self.children.get(&(parent, block.to_vec())) {
                Some(&id) => {
                    path.push(id);
                    parent = id;
                }
                None => break,
            }
        }
        path
    }

    /// Adds a block under `parent`; returns its id.
    fn add(&mut self, parent: u64, keys: Vec<PosKey>, rows: LayerRows, now: u64) -> u64 {
        let bytes = rows
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum();
        let id = self.next_id;
        self.next_id += 1;
        self.children.insert((parent, keys.clone()), id);
        let kids = self.kids.entry(parent).or_default();
        kids.push(id);
        if kids.len() == 1 {
            if let Some(p) = self.nodes.get(&parent) {
                self.leaves.remove(&(p.used, parent));
            }
        }
        self.nodes.insert(
            id,
            Node {
                parent,
                keys,
                rows: Arc::new(rows),
                bytes,
                used: now,
            },
        );
        self.leaves.insert((now, id));
        self.stats.bytes += bytes;
        id
    }

    fn touch(&mut self, id: u64, now: u64) {
        let node = self.nodes.get_mut(&id).expect("a path holds stored blocks");
        if self.leaves.remove(&(node.used, id)) {
            self.leaves.insert((now, id));
        }
        node.used = now;
    }

    /// Drops the least recently used leaf; `false` when nothing is left.
    fn evict_one(&mut self) -> bool {
        let Some((_, id)) = self.leaves.pop_first() else {
            return false;
        };
        let node = self.nodes.remove(&id).expect("leaves are stored blocks");
        self.children.remove(&(node.parent, node.keys));
        self.kids.remove(&id);
        self.stats.bytes -= node.bytes;
        self.stats.evictions += 1;
        if let Some(kids) = self.kids.get_mut(&node.parent) {
            kids.retain(|&k| k != id);
            if kids.is_empty() {
                self.kids.remove(&node.parent);
                if let Some(p) = self.nodes.get(&node.parent) {
                    self.leaves.insert((p.used, node.parent));
                }
            }
        }
        true
    }
}

/// Projected image features by image digest, least recently used dropped first beyond the
/// byte budget (0: off).
pub struct FeatureCache {
    budget: usize,
    inner: Mutex<Features>,
}

#[derive(Default)]
struct Features {
    map: HashMap<[u8; 32], (Tensor, u64)>,
    order: BTreeSet<(u64, [u8; 32])>,
    clock: u64,
    stats: CacheStats,
}

impl FeatureCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Features::default()),
        }
    }

    fn features(&self) -> std::sync::MutexGuard<'_, Features> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            budget: self.budget,
            ..self.features().stats
        }
    }

    /// The features of image `digest`, computing them with `encode` on a miss.
    pub fn get_or_encode(
        &self,
        digest: [u8; 32],
        encode: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.budget == 0 {
            return encode();
        }
        {
            let mut guard = self.features();
            let f = &mut *guard;
            f.clock += 1;
            let now = f.clock;
            if let Some((t, used)) = f.map.get_mut(&digest) {
                let (t, old) = (t.clone(), std::mem::replace(used, now));
                f.order.remove(&(old, digest));
                f.order.insert((now, digest));
                f.stats.hits += 1;
                return Ok(t);
            }
            f.stats.misses += 1;
        }
        let t = encode()?;
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        let mut guard = self.features();
        let f = &mut *guard;
        f.clock += 1;
        let now = f.clock;
        match f.map.insert(digest, (t.clone(), now)) {
            Some((_, old)) => {
                f.order.remove(&(old, digest));
            }
            None => f.stats.bytes += bytes,
        }
        f.order.insert((now, digest));
        while f.stats.bytes > self.budget {
            let Some((_, old)) = f.order.pop_first() else {
                break;
            };
            if let Some((t, _)) = f.map.remove(&old) {
                f.stats.bytes -= t.elem_count() * t.dtype().size_in_bytes();
                f.stats.evictions += 1;
            }
        }
        f.stats.entries = f.map.len();
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Rows whose values say which positions they are for, `layers` layers.
    fn rows(range: std::ops::Range<usize>, layers: usize) -> Result<LayerRows> {
        (0..layers)
            .map(|l| {
                let v: Vec<f32> = range.clone().map(|p| (p * 10 + l) as f32).collect();
                let t = Tensor::from_vec(v, (1, 1, range.len(), 1), &Device::Cpu)?;
                Ok((t.clone(), t))
            })
            .collect()
    }

    fn tokens(ids: impl IntoIterator<Item = u32>) -> Vec<PosKey> {
        ids.into_iter().map(PosKey::Token).collect()
    }

    const B: usize = PrefixCache::BLOCK;
    /// Bytes of one block of `rows(_, 2)`.
    const BLOCK_BYTES: usize = 2 * 2 * B * 4;

    #[test]
    fn the_longest_stored_prefix_is_found_with_its_rows() -> Result<()> {
        let cache = PrefixCache::new(1 << 20);
        let a = tokens(0..(3 * B as u32 + 5));
        cache.insert(&a, |r| rows(r, 2))?;
        assert_eq!(
            cache.stats().entries,
            4,
            "three whole blocks and a partial one"
        );
        // Shares two blocks and 7 positions of the third with `a`.
        let mut b = tokens(0..(2 * B as u32 + 7));
        b.extend(tokens([9999; 20]));
        let reuse = cache.lookup(&b, b.len() - 1);
        assert_eq!(reuse.tokens, 2 * B + 7);
        let layer1: Vec<f32> = Tensor::cat(
            &reuse.layers()?[1]
                .iter()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>(),
            2,
        )?
        .flatten_all()?
        .to_vec1()?;
        let want: Vec<f32> = (0..2 * B + 7).map(|p| (p * 10 + 1) as f32).collect();
        assert_eq!(layer1, want);
        // The limit keeps at least the last position out.
        assert_eq!(cache.lookup(&a[..2 * B], 2 * B - 1).tokens, 2 * B - 1);
        // The partial last block is found too, and storing it again adds nothing.
        assert_eq!(cache.lookup(&a, a.len()).tokens, a.len());
        cache.insert(&a, |_| panic!("all of `a` is stored"))?;
        // A different first token shares nothing, even with the same later blocks.
        let mut c = a.clone();
        c[0] = PosKey::Token(77);
        assert_eq!(cache.lookup(&c, c.len()).tokens, 0);
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (3, 1));
        assert_eq!(s.tokens_reused, (4 * B + 6 + a.len()) as u64);
        Ok(())
    }

    #[test]
    fn images_match_by_digest_and_row() -> Result<()> {
        let cache = PrefixCache::new(1 << 20);
        let img = |d: u8| -> Vec<PosKey> {
            (0..B as u32)
                .map(|row| PosKey::Image {
                    image: [d; 32],
                    row,
                })
                .collect()
        };
        let mut a = tokens(0..B as u32);
        a.extend(img(1));
        a.extend(tokens(0..B as u32));
        cache.insert(&a, |r| rows(r, 1))?;
        let mut b = tokens(0..B as u32);
        b.extend(img(2));
        b.extend(tokens(0..B as u32));
        assert_eq!(
            cache.lookup(&b, b.len()).tokens,
            B,
            "another image: text only"
        );
        assert_eq!(cache.lookup(&a, a.len()).tokens, 3 * B);
        Ok(())
    }

    #[test]
    fn eviction_keeps_the_store_under_budget_and_drops_the_least_recent_leaves() -> Result<()> {
        // Room for five blocks.
        let cache = PrefixCache::new(5 * BLOCK_BYTES);
        let system = tokens(0..B as u32);
        let conv = |n: u32| {
            let mut k = system.clone();
            k.extend(tokens((0..2 * B as u32).map(|i| 1000 * n + i)));
            k
        };
        for n in 1..=2 {
            cache.insert(&conv(n), |r| rows(r, 2))?;
        }
        assert_eq!(cache.stats().bytes, 5 * BLOCK_BYTES);
        // Conversation 1 is used again; inserting 3 must then drop 2's blocks, deepest first,
        // and never the shared system block.
        assert_eq!(cache.lookup(&conv(1), 3 * B).tokens, 3 * B);
        cache.insert(&conv(3), |r| rows(r, 2))?;
        let s = cache.stats();
        assert!(s.bytes <= 5 * BLOCK_BYTES, "{} bytes held", s.bytes);
        assert_eq!(s.evictions, 2);
        assert_eq!(cache.lookup(&conv(1), 3 * B).tokens, 3 * B);
        assert_eq!(cache.lookup(&conv(3), 3 * B).tokens, 3 * B);
        assert_eq!(
            cache.lookup(&conv(2), 3 * B).tokens,
            B,
            "only the system block"
        );
        // Under heavy churn the budget always holds.
        for n in 4..40 {
            cache.insert(&conv(n), |r| rows(r, 2))?;
            assert!(cache.stats().bytes <= 5 * BLOCK_BYTES);
        }
        Ok(())
    }

    #[test]
    fn a_zero_budget_stores_nothing() -> Result<()> {
        let cache = PrefixCache::new(0);
        let a = tokens(0..4 * B as u32);
        cache.insert(&a, |_| panic!("no rows are asked for"))?;
        assert_eq!(cache.lookup(&a, a.len()).tokens, 0);
        assert_eq!(cache.stats().entries, 0);
        Ok(())
    }

    #[test]
    fn feature_cache_is_bounded_and_keyed_by_digest() -> Result<()> {
        let t = |x: f32| Tensor::full(x, (1, 4, 8), &Device::Cpu);
        let bytes = 4 * 8 * DType::F32.size_in_bytes();
        let cache = FeatureCache::new(2 * bytes);
        let mut encoded = 0;
        for d in [1u8, 2, 1, 3, 1, 2] {
            cache.get_or_encode([d; 32], || {
                encoded += 1;
                t(d as f32)
            })?;
            assert!(cache.stats().bytes <= 2 * bytes);
        }
        // 1, 2 encoded; 1 hit; 3 evicts 2; 1 hit; 2 again.
        assert_eq!(encoded, 4);
        let got = cache.get_or_encode([1; 32], || panic!("1 is cached"))?;
        assert_eq!(got.flatten_all()?.to_vec1::<f32>()?[0], 1.0);
        Ok(())
    }

    #[test]
    fn digests_differ_in_one_pixel_and_in_shape() {
        let mut px = vec![0.5f32; 3 * 4 * 4];
        let a = image_digest(&px, (4, 4));
        px[17] = 0.5000001;
        assert_ne!(a, image_digest(&px, (4, 4)));
        px[17] = 0.5;
        assert_eq!(a, image_digest(&px, (4, 4)));
        assert_ne!(a, image_digest(&px, (2, 8)));
    }
}
