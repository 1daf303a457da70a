//! qemu-img's options that qdedup does not take: clap would answer "unexpected
//! argument" with a tip about `--`; a qemu-img user is told instead which
//! qemu-img option it is and why qdedup does not take it. (The harmless ones,
//! `-p`, `-W`, `-t`, `-T`, are accepted: see [`super::args::QemuImgConvertArgs`].)

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// Options of `qemu-img convert`: (option, what it does in qemu-img, why qdedup
/// refuses it).
const CONVERT: &[(&str, &str, &str)] = &[
    (
        "-n",
        "write into an existing target image",
        "qdedup always creates OUT (use --force to replace an existing file)",
    ),
    (
        "-C",
        "copy offloading",
        "qdedup writes a new, deduplicated layout: no range can be copied as it is",
    ),
    (
        "-r",
        "rate limit",
        "qdedup has no rate limit (limit its I/O with ionice or a cgroup)",
    ),
    (
        "--bitmaps",
        "copy persistent bitmaps",
        "qdedup writes no bitmaps",
    ),
    (
        "--skip-broken-bitmaps",
        "copy persistent bitmaps, skipping broken ones",
        "qdedup writes no bitmaps",
    ),
    (
        "--target-is-zero",
        "skip zeroing an existing target (with -n)",
        "qdedup always creates OUT",
    ),
    (
        "-s",
        "old form of -l (snapshot)",
        "use -l ID, -l NAME, -l snapshot.id=ID or -l snapshot.name=NAME",
    ),
    (
        "--target-image-opts",
        "target given as option string",
        "give OUT as a file name",
    ),
];

/// Options that no qdedup command takes.
const ANY: &[(&str, &str, &str)] = &[
    (
        "--image-opts",
        "image given as option string",
        "give the image as a file name",
    ),
    (
        "--object",
        "QEMU object definitions (secrets, throttling)",
        "qdedup reads no encrypted images and has no throttling",
    ),
];

/// The message for a clap error that is an unknown qemu-img option, `None` for
/// any other error (clap reports those itself).
pub(crate) fn explain_unknown(e: &clap::Error) -> Option<String> {
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let subcommand = std::env::args().nth(1).unwrap_or_default();
    explain(&subcommand, arg)
}

/// `arg` as clap reports it (`-S`, `--bitmaps`, `--bitmaps=x`) typed after
/// `qdedup SUBCOMMAND`.
fn explain(subcommand: &str, arg: &str) -> Option<String> {
    let name = arg.split('=').next().unwrap_or(arg);
    let table = if subcommand == "convert" {
        CONVERT
    } else {
        &[]
    };
    let (opt, what, why) = table.iter().chain(ANY).find(|(o, _, _)| *o == name)?;
    Some(format!(
        "qemu-img {subcommand}'s {opt} ({what}) is not supported: {why}"
    ))
}

#[cfg(test)]
mod tests {
    use super::explain;

    #[test]
    fn known_qemu_img_options_are_named_and_others_left_to_clap() {
        let m = explain("convert", "-n").unwrap();
        assert!(m.starts_with("qemu-img convert's -n ("), "{m}");
        assert!(explain("convert", "--bitmaps=x").is_some());
        assert!(explain("info", "--image-opts").is_some());
        assert!(explain("info", "-n").is_none());
        assert!(explain("convert", "--no-such-thing").is_none());
    }
}
