//! QEMU's image locks: the byte-range locks QEMU's `file-posix` driver takes on
//! every image file it opens (`raw_apply_lock_bytes`, `raw_check_lock_bytes`), so
//! that qdedup and QEMU see each other.
//!
//! A QEMU user of a file holds, for each permission bit `i` of the table below,
//! an Open File Description lock (OFD, `F_OFD_SETLK`, shared) on byte
//! `100 + i` if it uses the permission, and on byte `200 + i` if it does not let
//! others use it ("does not share" it):
//!
//! | bit | permission          | uses it at 100+       | refuses to share it at 200+ |
//! |-----|---------------------|-----------------------|-----------------------------|
//! | 0   | `consistent read`   | every reader, writer  | (block jobs)                |
//! | 1   | `write`             | writers               | every qcow2 user without -U |
//! | 2   | `write unchanged`   | (block jobs)          |                             |
//! | 3   | `resize`            | writers               | every qcow2 user without -U |
//!
//! Before it opens, a user tests (`F_OFD_GETLK` for an exclusive lock on one
//! byte) that nobody refuses to share what it uses (bytes `200 + i`), then that
//! nobody uses what it refuses to share (bytes `100 + i`), and fails with
//! *Failed to get "write" lock*, or *Failed to get shared "write" lock*, naming
//! the first conflict. qdedup takes what `qemu-img` takes for a qcow2 image file:
//!
//! - [`LockMode::Read`] (info, map, compare, estimate, convert's input and
//!   backing files, check): uses consistent read, refuses to share write and
//!   resize. A process writing the image makes it fail; other readers do not.
//! - [`LockMode::ForceShare`] (qemu-img's `-U`): uses consistent read, shares
//!   everything, so only a user refusing to share consistent read stops it.
//! - [`LockMode::Write`] (check's repair): uses consistent read, write and
//!   resize, refuses to share write and resize. Any other user of the image,
//!   reader or writer, makes it fail.
//!
//! The locks belong to the open file description: they last as long as the
//! [`File`] (and its clones) stays open, and closing another descriptor of the
//! same file does not drop them (unlike POSIX `F_SETLK` locks); a child
//! process shares them until it execs (descriptors are close-on-exec). On systems
//! without OFD locks (anything but Linux), [`lock`] takes nothing.
//!
//! ```no_run
//! use qdedup::image::lock::{lock, LockMode};
//! let file = std::fs::File::open("disk.qcow2").unwrap();
//! lock(&file, "disk.qcow2".as_ref(), LockMode::Read)?;
//! // QEMU cannot open disk.qcow2 for writing while `file` is open.
//! # Ok::<(), qdedup::Error>(())
//! ```

use std::fs::File;
use std::path::Path;

use crate::error::Result;

/// `BLK_PERM_CONSISTENT_READ`.
pub const BLK_PERM_CONSISTENT_READ: u32 = 0x01;
/// `BLK_PERM_WRITE`.
pub const BLK_PERM_WRITE: u32 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const BLK_PERM_WRITE_UNCHANGED: u32 = 0x04;
/// `BLK_PERM_RESIZE`.
pub const BLK_PERM_RESIZE: u32 = 0x08;
/// `BLK_PERM_ALL`: the permissions QEMU has a lock byte for.
pub const BLK_PERM_ALL: u32 = 0x0f;
/// `RAW_LOCK_PERM_BASE`: byte `100 + i` is locked by users of permission bit `i`.
pub const RAW_LOCK_PERM_BASE: u64 = 100;
/// `RAW_LOCK_SHARED_BASE`: byte `200 + i` is locked by users that do not share
/// permission bit `i`.
pub const RAW_LOCK_SHARED_BASE: u64 = 200;

/// What an open of an image is for, and so which QEMU locks it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Reading, as `qemu-img` opens an image read-only: refused while another
    /// process has it open for writing.
    Read,
    /// Reading with qemu-img's `-U`/`--force-share`: shares every permission, so
    /// it reads an image a running VM writes (and may see it inconsistent).
    ForceShare,
    /// Writing in place, as `qemu-img check -r` opens an image: refused while any
    /// other process has it open.
    Write,
}

impl LockMode {
    /// [`LockMode::ForceShare`] if `force_share`, else [`LockMode::Read`].
    pub fn read(force_share: bool) -> LockMode {
        if force_share {
            LockMode::ForceShare
        } else {
            LockMode::Read
        }
    }

    /// The permissions used and shared, as QEMU computes them for the file node
    /// under a qcow2 node (`bdrv_default_perms_for_storage`; `-U` shares all).
    pub fn permissions(self) -> (u32, u32) {
        let unshared = BLK_PERM_WRITE | BLK_PERM_RESIZE;
        match self {
            LockMode::Read => (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & !unshared),
            LockMode::ForceShare => (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL),
            LockMode::Write => (
                BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE,
                BLK_PERM_ALL & !unshared,
            ),
        }
    }
}

/// QEMU's name of one permission bit (`bdrv_perm_names`).
pub fn perm_name(perm: u32) -> &'static str {
    match perm {
        BLK_PERM_CONSISTENT_READ => "consistent read",
        BLK_PERM_WRITE => "write",
        BLK_PERM_WRITE_UNCHANGED => "write unchanged",
        BLK_PERM_RESIZE => "resize",
        _ => "unknown",
    }
}

/// Takes QEMU's locks for `mode` on `file` (opened from `path`, which errors
/// name) and checks that no other open of the file conflicts, as QEMU does
/// before it opens an image. They last as long as `file` stays open.
///
/// A conflict is an [`Error::Locked`](crate::Error::Locked) naming the lock
/// as QEMU does and, where it can be found, the process holding the image.
pub fn lock(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    imp::lock(file, path, mode)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use nix::errno::Errno;
    use nix::fcntl::{fcntl, FcntlArg};
    use nix::libc;

    use super::{perm_name, LockMode, BLK_PERM_ALL, RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE};
    use crate::error::{Error, Result};

    /// One byte at `offset`, as a lock of type `kind` (`F_RDLCK`, `F_WRLCK`,
    /// `F_UNLCK`); `l_pid` must be 0 for OFD locks.
    fn byte(offset: u64, kind: libc::c_int) -> libc::flock {
        libc::flock {
            // The lock types and SEEK_SET are small constants.
            l_type: kind as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: libc::off_t::try_from(offset).expect("lock bytes lie below 204"),
            l_len: 1,
            l_pid: 0,
        }
    }

    pub(super) fn lock(file: &File, path: &Path, mode: LockMode) -> Result<()> {
        let (perm, shared) = mode.permissions();
        // raw_apply_lock_bytes: a shared lock on each byte we need.
        for i in 0..BLK_PERM_ALL.count_ones() {
            let bit = 1u32 << i;
            for (wanted, base) in [
                (perm & bit != 0, RAW_LOCK_PERM_BASE),
                (shared & bit == 0, RAW_LOCK_SHARED_BASE),
            ] {
                if !wanted {
                    continue;
                }
                let off = base + u64::from(i);
                match fcntl(file, FcntlArg::F_OFD_SETLK(&byte(off, libc::F_RDLCK))) {
                    Ok(_) => {}
                    // Filesystems without locks: QEMU warns and goes on unlocked.
                    Err(Errno::ENOLCK | Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(()),
                    Err(e) => {
                        return Err(Error::Locked {
                            path: path.display().to_string(),
                            lock: format!("byte {off}"),
                            holder: holder(file, e),
                        })
                    }
                }
            }
        }
        // A conflict seen for a moment may be a copy of one of this process's
        // own descriptors of the file in a child being spawned (it goes at
        // exec): look again for a little while before refusing.
        let mut tries = 0;
        let (bit, shared_word, pid) = loop {
            match conflict(file, perm, shared) {
                None => return Ok(()),
                Some(c) if tries == RETRIES => break c,
                Some(_) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        };
        let hint = match mode {
            LockMode::Write => "stop it first; nothing was written",
            _ => "-U/--force-share (force_share) reads it anyway, maybe inconsistent",
        };
        Err(Error::Locked {
            path: path.display().to_string(),
            lock: format!("{shared_word}\"{}\"", perm_name(bit)),
            holder: format!("{}; {hint}", holder_of(file, pid)),
        })
    }

    /// How many times [`lock`] looks again at a conflict (10 ms apart).
    const RETRIES: u32 = 20;

    /// `raw_check_lock_bytes`: the first conflict, as (permission bit, `""` or
    /// `"shared "`, the holder's pid where the kernel tells): somebody refuses
    /// to share what we use, or uses what we refuse to share.
    fn conflict(file: &File, perm: u32, shared: u32) -> Option<(u32, &'static str, libc::pid_t)> {
        for (base, set, shared_word) in [
            (RAW_LOCK_SHARED_BASE, perm, ""),
            (RAW_LOCK_PERM_BASE, !shared & BLK_PERM_ALL, "shared "),
        ] {
            for i in 0..BLK_PERM_ALL.count_ones() {
                let bit = 1u32 << i;
                if set & bit == 0 {
                    continue;
                }
                let mut fl = byte(base + u64::from(i), libc::F_WRLCK);
                match fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)) {
                    Ok(_) if i32::from(fl.l_type) == libc::F_UNLCK => {}
                    Ok(_) => return Some((bit, shared_word, fl.l_pid)),
                    // Locks cannot be tested here: QEMU goes on unlocked.
                    Err(_) => return None,
                }
            }
        }
        None
    }

    /// Who holds a byte whose shared lock we could not take.
    fn holder(file: &File, e: Errno) -> String {
        let mut fl = byte(0, libc::F_RDLCK);
        fl.l_len = 0;
        let pid = match fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)) {
            Ok(_) if i32::from(fl.l_type) != libc::F_UNLCK => fl.l_pid,
            _ => -1,
        };
        format!("{} ({e})", holder_of(file, pid))
    }

    /// The process holding a conflicting lock: `pid` where the kernel tells
    /// (a POSIX lock), else the other processes that have the file open, found
    /// in /proc (OFD locks, QEMU's, have no owning process).
    fn holder_of(file: &File, pid: libc::pid_t) -> String {
        if pid > 0 {
            return format!("held by {}", describe(pid.unsigned_abs()));
        }
        let others = file
            .metadata()
            .map(|m| openers(m.dev(), m.ino()))
            .unwrap_or_default();
        if others.is_empty() {
            "another process is using the image".into()
        } else {
            let list: Vec<String> = others.into_iter().map(describe).collect();
            format!("the image is open in {}", list.join(", "))
        }
    }

    /// `comm (pid N)`, or `pid N`.
    fn describe(pid: u32) -> String {
        match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            Ok(c) => format!("{} (pid {pid})", c.trim_end()),
            Err(_) => format!("pid {pid}"),
        }
    }

    /// The other processes with a descriptor on the file (`dev`, `ino`), as far
    /// as /proc lets us see them; at most 8.
    fn openers(dev: u64, ino: u64) -> Vec<u32> {
        let me = std::process::id();
        let mut found = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return found;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            let open = fds.flatten().any(|fd| {
                std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
            });
            if open {
                found.push(pid);
                if found.len() == 8 {
                    break;
                }
            }
        }
        found
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::fs::File;
    use std::path::Path;

    use super::LockMode;
    use crate::error::Result;

    /// No OFD locks here: nothing is taken.
    pub(super) fn lock(_file: &File, _path: &Path, _mode: LockMode) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_qemus_for_a_qcow2_file_node() {
        assert_eq!(LockMode::Read.permissions(), (0x01, 0x05));
        assert_eq!(LockMode::ForceShare.permissions(), (0x01, 0x0f));
        assert_eq!(LockMode::Write.permissions(), (0x0b, 0x05));
        assert_eq!(LockMode::read(true), LockMode::ForceShare);
        assert_eq!(perm_name(BLK_PERM_RESIZE), "resize");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn readers_share_and_a_writer_is_refused_within_one_process() {
        // Separate opens are separate open file descriptions: their OFD locks
        // conflict with each other as another process's would.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let open = || File::options().read(true).write(true).open(&path).unwrap();
        let (r1, r2) = (open(), open());
        lock(&r1, &path, LockMode::Read).unwrap();
        lock(&r2, &path, LockMode::Read).unwrap();
        let w = open();
        let e = lock(&w, &path, LockMode::Write).unwrap_err();
        assert!(
            matches!(&e, crate::Error::Locked { lock, .. } if lock == "\"write\""),
            "{e}"
        );
        drop((r1, r2, w));
        let w = open();
        lock(&w, &path, LockMode::Write).unwrap();
        let e = lock(&open(), &path, LockMode::Read).unwrap_err();
        assert!(
            matches!(&e, crate::Error::Locked { lock, .. } if lock == "shared \"write\""),
            "{e}"
        );
        lock(&open(), &path, LockMode::ForceShare).unwrap();
    }
}
