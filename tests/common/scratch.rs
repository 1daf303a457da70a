//! Scratch directories: every test (and every case of a looped test that needs
//! one) gets its own, removed when it is dropped.

use std::path::{Path, PathBuf};

/// A temporary directory for one test.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    /// A new, empty directory.
    pub fn new() -> Scratch {
        Scratch(tempfile::tempdir().expect("a temporary directory"))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.path().join(name)
    }

    /// Creates the directory `name` inside this one and returns its path.
    pub fn subdir(&self, name: impl AsRef<Path>) -> PathBuf {
        let p = self.join(name);
        std::fs::create_dir(&p).unwrap();
        p
    }

    /// The names of the directory's entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        dir_entries(self.path())
    }
}

/// Lists the entries of `dir`, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
