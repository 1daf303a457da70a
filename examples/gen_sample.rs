//! Writes a deterministic sample disk image (see `qdedup::sample`).
//!
//! ```text
//! cargo run --release --example gen_sample -- OUT SIZE mixed|random|sparse|scattered [SEED]
//! ```
//!
//! `SIZE` takes qemu-img suffixes (`64M`, `2G`). `mixed` is 25% zero, 35% repeats,
//! 20% text, 20% random in 64 KiB blocks; `random` shares nothing; `sparse` is the
//! mixed image with its zero blocks left as holes; `scattered` is a sparse file
//! with 4 KiB of random data at the start of every 512 MiB, the rest holes (one
//! allocated L2 table per piece at 64 KiB clusters: the memory case of issue 18).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qdedup::convert::options::parse_size;
use qdedup::sample::{generate, Mix, Rng};

/// Distance between the pieces of a `scattered` image.
const SCATTER_STRIDE: u64 = 512 << 20;
/// Data at the start of each piece.
const SCATTER_PIECE: usize = 4096;

/// A sparse file of `size` bytes with a random 4 KiB piece every 512 MiB.
fn scattered(out: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(out)?;
    f.set_len(size)?;
    let mut rng = Rng::new(seed);
    let mut piece = vec![0u8; SCATTER_PIECE];
    let mut off = 0;
    while off < size {
        rng.fill(&mut piece);
        // The last piece is cut at the end of the file.
        let n = (size - off).min(SCATTER_PIECE as u64) as usize;
        f.write_all_at(&piece[..n], off)?;
        off += SCATTER_STRIDE;
    }
    f.sync_all()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 || args.len() > 4 {
        eprintln!("usage: gen_sample OUT SIZE mixed|random|sparse|scattered [SEED]");
        return ExitCode::from(2);
    }
    let out = PathBuf::from(&args[0]);
    let size = match parse_size(&args[1]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gen_sample: {e}");
            return ExitCode::from(2);
        }
    };
    let seed = match args.get(3).map(|s| s.parse::<u64>()) {
        None => 1,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            eprintln!("gen_sample: bad seed: {e}");
            return ExitCode::from(2);
        }
    };
    if args[2] == "scattered" {
        if let Err(e) = scattered(&out, size, seed) {
            eprintln!("gen_sample: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    let mix = match args[2].as_str() {
        "mixed" => Mix::MIXED,
        "random" => Mix::RANDOM,
        "sparse" => Mix {
            sparse: true,
            ..Mix::MIXED
        },
        other => {
            eprintln!("gen_sample: unknown kind '{other}' (mixed, random, sparse, scattered)");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = generate(&out, size, seed, mix) {
        eprintln!("gen_sample: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
