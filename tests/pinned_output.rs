//! The bytes `convert` writes for the sample inputs are pinned: refactoring the
//! qcow2 core (issue 12) must not change a single output byte. A change that is
//! meant to change the output updates these digests in the same commit and says
//! why.

mod common;

use common::{assert_qemu_check_clean, assert_qemu_compare_same, qdedup_ok, Scratch};
use qdedup::sample::{generate, Mix};

const SPARSE: Mix = Mix {
    sparse: true,
    ..Mix::MIXED
};

/// (sample, convert options, BLAKE3 of the output).
const PINNED: &[(Mix, &[&str], &str)] = &[
    (
        Mix::MIXED,
        &[],
        "b37931cfe7e6f48179786f33fe6e024f4018b0c7dda42f898d9173dcd61b52cb",
    ),
    (
        Mix::MIXED,
        &["-c"],
        "da2eec24dae91c78dbb4da8d9afab42ab311beaf6ddc4ef08470fa98f0eaf4ab",
    ),
    // zlib level 6, the default until issue 19 made it 5: the bytes `-c` wrote
    // before.
    (
        Mix::MIXED,
        &["-c", "--compression-level", "6"],
        "e4430b51ffa9854451f3a7e390e0f9c67f67cb0f1c7e36339102d814ad5ad5bf",
    ),
    (
        Mix::MIXED,
        &["-c", "-o", "compression_type=zstd"],
        "cc23d513f8096e7f4138a812dcb1c2dbb8c147fd10589587b95bb0f722b5b9f4",
    ),
    (
        Mix::MIXED,
        &["-o", "cluster_size=4k,refcount_bits=2"],
        "e864087ffa797327713904923beaa5610969b86349927585fabb8356aa96d97a",
    ),
    (
        Mix::MIXED,
        &["-c", "-o", "cluster_size=512"],
        "0a89e79000219a52d8bdad46935304c5cc83ff63737a3d0331db45b8ab7380b7",
    ),
    (
        SPARSE,
        &["-o", "cluster_size=2M,refcount_bits=64"],
        "4c7420852a6a16cb0759cf16ce9876ce7224ecb914b5a2c963c5986769710c31",
    ),
    (
        Mix::RANDOM,
        &["-m", "0"],
        "d3a81fb25088e08f770bbc364996a867842bd2ee3eca58d2f1fcea62a244c74d",
    ),
];

#[test]
fn convert_output_bytes_for_the_sample_inputs_are_pinned() {
    let dir = Scratch::new();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (i, (mix, opts, want)) in PINNED.iter().enumerate() {
        let input = dir.join(format!("in{i}.raw"));
        generate(&input, 6 << 20, 7, *mix).unwrap();
        let out = dir.join(format!("out{i}.qcow2"));
        let mut args: Vec<&std::ffi::OsStr> = vec!["convert".as_ref()];
        args.extend(opts.iter().map(std::ffi::OsStr::new));
        args.push(input.as_os_str());
        args.push(out.as_os_str());
        qdedup_ok(&args);
        assert_qemu_check_clean(&out);
        assert_qemu_compare_same(&input, "raw", &out);
        let got = blake3::hash(&std::fs::read(&out).unwrap())
            .to_hex()
            .to_string();
        if got != *want {
            wrong.push(format!("{i} {opts:?}: {got}"));
        }
        checked += 1;
    }
    assert_eq!(checked, PINNED.len());
    assert!(
        wrong.is_empty(),
        "output bytes changed:\n{}",
        wrong.join("\n")
    );
}
