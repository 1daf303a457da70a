//! Writes a deterministic sample disk image (see `qdedup::sample`).
//!
//! ```text
//! cargo run --release --example gen_sample -- OUT SIZE mixed|random|sparse [SEED]
//! ```
//!
//! `SIZE` takes qemu-img suffixes (`64M`, `2G`). `mixed` is 25% zero, 35% repeats,
//! 20% text, 20% random in 64 KiB blocks; `random` shares nothing; `sparse` is the
//! mixed image with its zero blocks left as holes.

use std::path::PathBuf;
use std::process::ExitCode;

use qdedup::convert::options::parse_size;
use qdedup::sample::{generate, Mix};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 || args.len() > 4 {
        eprintln!("usage: gen_sample OUT SIZE mixed|random|sparse [SEED]");
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
    let mix = match args[2].as_str() {
        "mixed" => Mix::MIXED,
        "random" => Mix::RANDOM,
        "sparse" => Mix {
            sparse: true,
            ..Mix::MIXED
        },
        other => {
            eprintln!("gen_sample: unknown kind '{other}' (mixed, random, sparse)");
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
    if let Err(e) = generate(&out, size, seed, mix) {
        eprintln!("gen_sample: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
