//! Deterministic sample disk images for the demo, tests and benchmarks.
//!
//! An image is made of 64 KiB blocks, each drawn (from a seeded PRNG) as zeros,
//! a repeat of one of a few template blocks, compressible text, or random bytes,
//! in proportions given by a [`Mix`].
//!
//! Hidden from the documentation: not part of the library's API.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{IoContext, Result};

/// Block size of the generator.
pub const BLOCK: usize = 64 << 10;

/// Proportions (in percent) of each kind of block; the rest is random data.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// All-zero blocks.
    pub zero: u32,
    /// Repeats of a few template blocks.
    pub repeat: u32,
    /// Compressible text.
    pub text: u32,
    /// Number of distinct templates repeats are drawn from.
    pub templates: u32,
    /// Leave zero blocks as holes (sparse file) instead of writing zeros.
    pub sparse: bool,
}

impl Mix {
    /// The benchmark's mixed image: 25% zero, 35% repeats, 20% text, 20% random.
    pub const MIXED: Mix = Mix {
        zero: 25,
        repeat: 35,
        text: 20,
        templates: 64,
        sparse: false,
    };
    /// Nothing to share: all random.
    pub const RANDOM: Mix = Mix {
        zero: 0,
        repeat: 0,
        text: 0,
        templates: 1,
        sparse: false,
    };
}

/// A small, fast, deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (seed 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "block",
    "device",
    "cluster",
    "image",
    "qemu",
    "refcount",
    "table",
    "guest",
    "host",
    "write",
    "read",
    "sector",
    "journal",
    "inode",
    "extent",
    "superblock",
    "mount",
    "config",
    "service",
    "started",
    "error",
    "warning",
    "info",
    "debug",
    "packet",
    "network",
    "storage",
    "volume",
    "snapshot",
    "backup",
];

/// Fills `buf` with log-like text (compresses about 3–4×).
pub fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    let mut pos = 0;
    while pos < buf.len() {
        let w = if rng.below(12) == 0 {
            "\n"
        } else {
            WORDS[rng.below(WORDS.len() as u64) as usize]
        };
        for &b in w.as_bytes().iter().chain(b" ") {
            if pos < buf.len() {
                buf[pos] = b;
                pos += 1;
            }
        }
    }
}

/// Writes a sample image of `size` bytes (rounded down to whole 64 KiB blocks plus
/// a partial tail) to `w`, calling `skip` for sparse zero blocks.
pub fn generate(path: &Path, size: u64, seed: u64, mix: Mix) -> Result<()> {
    let mut f = File::create(path).ctx(|| format!("cannot create {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut templates = vec![vec![0u8; BLOCK]; mix.templates.max(1) as usize];
    for (i, t) in templates.iter_mut().enumerate() {
        if i % 2 == 0 {
            rng.fill(t);
        } else {
            fill_text(&mut rng, t);
        }
    }
    let mut block = vec![0u8; BLOCK];
    let mut pos = 0u64;
    // Buffer writes so that generating 2 GiB is quick.
    let mut out = std::io::BufWriter::with_capacity(8 << 20, &mut f);
    let mut pending_hole = 0u64;
    while pos < size {
        let n = (size - pos).min(BLOCK as u64) as usize;
        let r = rng.below(100) as u32;
        let zero = r < mix.zero;
        if zero {
            block[..n].fill(0);
        } else if r < mix.zero + mix.repeat {
            let t = &templates[rng.below(templates.len() as u64) as usize];
            block[..n].copy_from_slice(&t[..n]);
        } else if r < mix.zero + mix.repeat + mix.text {
            fill_text(&mut rng, &mut block[..n]);
        } else {
            rng.fill(&mut block[..n]);
        }
        if zero && mix.sparse {
            pending_hole += n as u64;
        } else {
            if pending_hole > 0 {
                out.flush().ctx(|| "write".into())?;
                let hole = i64::try_from(pending_hole).expect("holes are smaller than 2^63");
                std::io::Seek::seek(out.get_mut(), std::io::SeekFrom::Current(hole))
                    .ctx(|| "seek".into())?;
                pending_hole = 0;
            }
            out.write_all(&block[..n])
                .ctx(|| format!("cannot write {}", path.display()))?;
        }
        pos += n as u64;
    }
    out.flush()
        .ctx(|| format!("cannot write {}", path.display()))?;
    drop(out);
    f.set_len(size)
        .ctx(|| format!("cannot size {}", path.display()))?;
    Ok(())
}
