//! Running the qdedup binary under test: one runner, with assertions that show
//! the command line and its output when they fail.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Path of the qdedup binary under test.
pub fn qdedup_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qdedup"))
}

/// Runs qdedup with `args`.
pub fn qdedup(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Output {
    Command::new(qdedup_bin())
        .args(args)
        .output()
        .expect("qdedup runs")
}

fn owned(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Vec<OsString> {
    args.into_iter().map(|a| a.as_ref().to_owned()).collect()
}

/// Runs qdedup and asserts it exited 0, showing the command and its output if not.
pub fn qdedup_ok(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Output {
    let args = owned(args);
    let o = qdedup(&args);
    assert!(o.status.success(), "qdedup {args:?} failed:\n{}", said(&o));
    o
}

/// Runs qdedup, asserts it exited 0 and returns its stdout parsed as JSON.
pub fn qdedup_json(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Value {
    let args = owned(args);
    stdout_json(&qdedup_ok(&args), &format!("qdedup {args:?}"))
}

/// Runs qdedup and asserts it failed without panicking (exited non-zero, not
/// 101, not killed) and printed its error as one line on stderr; returns that
/// line.
pub fn qdedup_fails_in_one_line(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> String {
    let args = owned(args);
    let o = qdedup(&args);
    assert!(
        !o.status.success(),
        "qdedup {args:?} succeeded:\n{}",
        said(&o)
    );
    assert_ne!(
        exit_code(&o),
        101,
        "qdedup {args:?} panicked:\n{}",
        said(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "one-line error, got: {err}");
    err
}

/// `o`'s stdout parsed as JSON (`what` names the command in the failure).
pub fn stdout_json(o: &Output, what: &str) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: bad JSON ({e}):\n{}", said(o)))
}

/// Runs `qdedup convert --output json ARGS INPUT OUTPUT`, asserts success and
/// returns the parsed report.
pub fn convert_json(args: &[&str], input: &Path, output: &Path) -> Value {
    qdedup_json(argv(
        &["convert", "--output", "json"],
        args,
        &[input.as_os_str(), output.as_os_str()],
    ))
}

/// Runs `qdedup WORDS --output json IMG` (`info`, `map`, `check`, `estimate` with
/// their options in `words`), asserts success and returns the parsed report.
pub fn report_json(words: &[&str], img: &Path) -> Value {
    qdedup_json(argv(words, &["--output", "json"], &[img.as_os_str()]))
}

/// Exit code of a finished command (a signal fails the test).
pub fn exit_code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed by a signal")
}

/// stdout and stderr of `o`, for assertion messages.
pub fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A command line: the fixed words `head`, the caller's options `extra`, then
/// `tail` (paths, mostly).
pub fn argv<'a>(head: &[&'a str], extra: &[&'a str], tail: &[&'a OsStr]) -> Vec<&'a OsStr> {
    head.iter()
        .chain(extra)
        .map(|s| OsStr::new(*s))
        .chain(tail.iter().copied())
        .collect()
}

/// `qdedup check --output json ARGS`: its exit code and JSON report (printed for
/// every verdict, 0 to 3).
pub fn check_json(args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> (i32, Value) {
    let args: Vec<OsString> = ["check", "--output", "json"]
        .into_iter()
        .map(OsString::from)
        .chain(owned(args))
        .collect();
    let o = qdedup(&args);
    (exit_code(&o), stdout_json(&o, &format!("qdedup {args:?}")))
}

/// Converts `input` with `opts` by the sequential converter (`-m 0`), then with
/// 1, 2 and 8 workers and at most `in_flight` bytes in flight (so that workers
/// finish out of order), into files under `dir`; asserts every output is
/// byte-identical to the sequential one, which it returns.
pub fn assert_any_worker_count_writes_the_same(
    input: &Path,
    dir: &Path,
    opts: &[&str],
    in_flight: &str,
) -> PathBuf {
    let reference = dir.join("seq.qcow2");
    let seq: Vec<&str> = ["-m", "0"].iter().chain(opts).copied().collect();
    convert_json(&seq, input, &reference);
    let want = std::fs::read(&reference).unwrap();
    for m in ["1", "2", "8"] {
        let out = dir.join(format!("m{m}.qcow2"));
        let args: Vec<&str> = ["-m", m]
            .iter()
            .chain(opts)
            .chain(&["--max-in-flight", in_flight])
            .copied()
            .collect();
        convert_json(&args, input, &out);
        assert!(
            std::fs::read(&out).unwrap() == want,
            "{m} workers differ from the sequential converter ({opts:?})"
        );
    }
    reference
}

/// `o`'s stdout, as text (asserted to be UTF-8).
pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

/// `o`'s stderr, as text (asserted to be UTF-8).
pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("stderr is UTF-8")
}

/// Runs qdedup with `args` in the working directory `dir` (for relative names).
pub fn qdedup_in<I, S>(dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(qdedup_bin())
        .current_dir(dir)
        .args(args)
        .output()
        .expect("qdedup runs")
}

/// Asserts the finished command `what` exited 0 and returns its stdout.
pub fn succeeded(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed:\n{}", said(o));
    String::from_utf8(o.stdout.clone()).unwrap_or_else(|e| panic!("{what}: stdout not UTF-8: {e}"))
}

/// Asserts the finished command `what` exited 0 and returns its stdout as JSON.
pub fn succeeded_json(o: &Output, what: &str) -> Value {
    assert!(o.status.success(), "{what} failed:\n{}", said(o));
    stdout_json(o, what)
}
