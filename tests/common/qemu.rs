//! Running QEMU's tools, the oracle: a missing tool fails the test (it must not
//! silently skip), and a failing command shows its command line and output.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use super::cli::{argv, exit_code, said};
use super::scratch::Scratch;

/// Runs a qemu tool; a missing tool fails the test (it must not silently skip).
pub fn qemu(tool: &str, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is required for this test (apt-get install qemu-utils): {e}")
    })
}

/// Runs a qemu tool like [`qemu`] and asserts it exits 0, showing the command and
/// its output if not.
pub fn qemu_ok(tool: &str, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Output {
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let o = qemu(tool, &args);
    assert!(o.status.success(), "{tool} {args:?} failed:\n{}", said(&o));
    o
}

/// Runs `qemu-img ARGS` and asserts it succeeded.
pub fn qemu_img(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Output {
    qemu_ok("qemu-img", args)
}

/// Runs qemu-io commands (qemu-io's own syntax, one per `-c`) on the qcow2 image
/// `img`, and asserts they all succeeded: exit 0 and no "error" or "failed" in
/// the output.
pub fn qemu_io(img: &Path, cmds: &[&str]) -> Output {
    qemu_io_fmt(img, "qcow2", cmds)
}

/// [`qemu_io`] on an image of format `fmt` (`raw`, `qcow2`).
pub fn qemu_io_fmt(img: &Path, fmt: &str, cmds: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec!["-f".as_ref(), fmt.as_ref()];
    for c in cmds {
        args.push("-c".as_ref());
        args.push(c.as_ref());
    }
    args.push(img.as_os_str());
    let o = qemu_ok("qemu-io", &args);
    let said = said(&o);
    assert!(
        !said.contains("error") && !said.contains("failed"),
        "qemu-io {cmds:?} on {} failed: {said}",
        img.display()
    );
    o
}

/// `qemu-img create -q -f qcow2 [EXTRA] PATH [SIZE]` (no size: the backing
/// file's). Returns `path`.
pub fn create_qcow2(
    path: std::path::PathBuf,
    size: Option<&str>,
    extra: &[&str],
) -> std::path::PathBuf {
    let mut args = argv(&["create", "-q", "-f", "qcow2"], extra, &[path.as_os_str()]);
    args.extend(size.map(OsStr::new));
    qemu_img(args);
    path
}

/// `qemu-img convert -f raw -O qcow2 [EXTRA] RAW IMG`.
pub fn qcow2_from_raw(raw: &Path, img: &Path, extra: &[&str]) {
    qemu_img(argv(
        &["convert", "-f", "raw", "-O", "qcow2"],
        extra,
        &[raw.as_os_str(), img.as_os_str()],
    ));
}

/// `qemu-img convert -O qcow2 [EXTRA] INPUT OUT` (input format probed); returns
/// the size of the file qemu-img wrote.
pub fn qemu_convert_qcow2(input: &Path, out: &Path, extra: &[&str]) -> u64 {
    qemu_img(argv(
        &["convert", "-O", "qcow2"],
        extra,
        &[input.as_os_str(), out.as_os_str()],
    ));
    std::fs::metadata(out).unwrap().len()
}

/// `qemu-img convert -O raw [EXTRA] SRC OUT`: QEMU's view of the guest, as a raw
/// file. `src` may be a `json:` spec.
pub fn qemu_raw_view(src: &OsStr, out: &Path, extra: &[&str]) {
    qemu_img(argv(
        &["convert", "-O", "raw"],
        extra,
        &[src, out.as_os_str()],
    ));
}

/// QEMU's view of the guest of `src` (see [`qemu_raw_view`]), as bytes.
pub fn qemu_view(src: &OsStr, extra: &[&str]) -> Vec<u8> {
    let dir = Scratch::new();
    let out = dir.join("view.raw");
    qemu_raw_view(src, &out, extra);
    std::fs::read(&out).unwrap()
}

/// A `json:` image spec QEMU reads as the qcow2 image `img` alone, without its
/// backing file (`"backing": null`).
pub fn top_alone_spec(img: &Path) -> String {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": img.to_str().unwrap()},
    });
    format!("json:{spec}")
}

/// `qemu-img snapshot -c NAME IMG`.
pub fn qemu_snapshot(img: &Path, name: &str) {
    qemu_img([
        "snapshot".as_ref(),
        "-c".as_ref(),
        name.as_ref(),
        img.as_os_str(),
    ]);
}

/// `qemu-img resize [EXTRA] IMG SIZE` (e.g. `--shrink` in `extra`).
pub fn qemu_resize(img: &Path, size: &str, extra: &[&str]) {
    qemu_img(argv(
        &["resize", "-q"],
        extra,
        &[img.as_os_str(), OsStr::new(size)],
    ));
}

/// `qemu-img info --output=json IMG` (format probed), parsed.
pub fn qemu_info(img: &Path) -> Value {
    let o = qemu_img(["info".as_ref(), "--output=json".as_ref(), img.as_os_str()]);
    serde_json::from_slice(&o.stdout).expect("qemu-img info JSON")
}

/// The virtual size `qemu-img info` reports for `img` (format probed).
pub fn qemu_virtual_size(img: &Path) -> u64 {
    qemu_info(img)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// `qemu-img map --output=json IMG`, parsed.
pub fn qemu_map(img: &Path) -> Value {
    let o = qemu_img(["map".as_ref(), "--output=json".as_ref(), img.as_os_str()]);
    serde_json::from_slice(&o.stdout).expect("qemu-img map JSON")
}

/// `qemu-img check --output=json ARGS`: its exit code and JSON document (it
/// prints one for every verdict, 0 to 3).
pub fn qemu_check_json(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> (i32, Value) {
    let head = ["check".as_ref(), "--output=json".as_ref()];
    let args: Vec<OsString> = head
        .into_iter()
        .map(OsStr::to_owned)
        .chain(args.into_iter().map(|a| a.as_ref().to_owned()))
        .collect();
    let out = qemu("qemu-img", &args);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img check printed no JSON ({e}): {}", said(&out)));
    (exit_code(&out), json)
}

/// `qemu-img check IMG`, whatever its verdict (its exit code says it).
pub fn qemu_img_check(img: &Path) -> Output {
    qemu("qemu-img", ["check".as_ref(), img.as_os_str()])
}

/// Asserts `qemu-img check` finds `img` clean.
pub fn assert_qemu_check_clean(img: &Path) {
    let o = qemu_img_check(img);
    assert!(
        o.status.success(),
        "qemu-img check {} failed:\n{}",
        img.display(),
        said(&o)
    );
}

/// Asserts `qemu-img compare` finds the guest contents identical.
pub fn assert_qemu_compare_same(a: &Path, a_fmt: &str, b: &Path) {
    let o = qemu(
        "qemu-img",
        [
            "compare".as_ref(),
            "-f".as_ref(),
            a_fmt.as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
        ],
    );
    assert!(
        o.status.success(),
        "qemu-img compare {} {} failed:\n{}",
        a.display(),
        b.display(),
        said(&o)
    );
}

/// Runs a qemu tool in the working directory `dir` and asserts it exits 0 (a
/// missing tool fails the test).
pub fn qemu_ok_in<I, S>(dir: &Path, tool: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let o = Command::new(tool)
        .current_dir(dir)
        .args(&args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} is required for this test (apt-get install qemu-utils): {e}")
        });
    assert!(
        o.status.success(),
        "{tool} {args:?} in {} failed:\n{}",
        dir.display(),
        said(&o)
    );
    o
}

/// A QEMU tool kept running with an image open, holding QEMU's image locks on
/// it, until dropped (then killed and reaped).
pub struct QemuHolder {
    child: std::process::Child,
    what: String,
}

impl QemuHolder {
    /// `qemu-io -f qcow2 [EXTRA] IMG`, interactive, its commands read from a pipe
    /// that stays open: it holds the image as a VM would (read-write, or
    /// read-only with `-r` in `extra`).
    pub fn qemu_io(img: &Path, extra: &[&str]) -> QemuHolder {
        let args = argv(&["-f", "qcow2"], extra, &[img.as_os_str()]);
        QemuHolder::spawn("qemu-io", &args, img)
    }

    /// `qemu-nbd -f qcow2 -k SOCKET [EXTRA] IMG` serving the image on a unix
    /// socket beside it (read-write, or read-only with `-r` in `extra`).
    pub fn qemu_nbd(img: &Path, extra: &[&str]) -> QemuHolder {
        let sock = img.with_extension("nbd.sock");
        let mut args: Vec<&OsStr> = vec!["-f".as_ref(), "qcow2".as_ref(), "-k".as_ref()];
        args.push(sock.as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        args.push(img.as_os_str());
        QemuHolder::spawn("qemu-nbd", &args, img)
    }

    fn spawn(tool: &str, args: &[&OsStr], img: &Path) -> QemuHolder {
        use std::process::Stdio;
        let child = Command::new(tool)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{tool} is required for this test (apt-get install qemu-utils): {e}")
            });
        let holder = QemuHolder {
            child,
            what: format!("{tool} {args:?}"),
        };
        holder.wait_for_locks(img);
        holder
    }

    /// Waits (10 s at most) until some process holds an OFD lock on `img`, as
    /// /proc/locks lists them.
    fn wait_for_locks(&self, img: &Path) {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(img).unwrap().ino();
        let needle = format!(":{ino} ");
        for _ in 0..1000 {
            let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            if locks
                .lines()
                .any(|l| l.contains("OFDLCK") && l.contains(&needle))
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{} never locked {}", self.what, img.display());
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
