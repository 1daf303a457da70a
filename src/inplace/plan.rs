//! The plan: which host clusters hold the same bytes, which one of each group
//! stays (the survivor) and which are remapped to it and freed.
//!
//! Every candidate cluster is read once, in file order, and hashed (BLAKE3,
//! 128 bits) to find groups; a hash only proposes a pair: the two clusters are
//! compared byte for byte before a remap is planned (as the kernel's
//! FIDEDUPERANGE compares before it shares). The survivor of a group is a cluster
//! that must stay anyway (a snapshot or a skipped table refers to it) or else the
//! one at the lowest offset, so that `--compact` has less to move. A survivor
//! takes remaps while its refcount stays within the image's maximum
//! (2^refcount_bits − 1); a remap that would pass it makes the duplicate the
//! group's next survivor instead.

use crate::error::{IoContext, Result};
use crate::io::ReadAt;

use super::scan::{Host, Scan};

/// Bytes read at once while hashing (runs of adjacent clusters).
const READ_CHUNK: u64 = 4 << 20;

/// One planned remap: every changeable entry of host `from` is pointed at host
/// `to`, whose refcount rises by their number; `from` is then freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Remap {
    /// Index in [`Scan::hosts`] of the duplicate.
    pub(crate) from: usize,
    /// Index in [`Scan::hosts`] of the survivor.
    pub(crate) to: usize,
}

/// The plan and what making it found.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Remaps in survivor order.
    pub(crate) remaps: Vec<Remap>,
    /// Clusters read and hashed.
    pub(crate) clusters_hashed: u64,
    /// Pairs with equal hashes but different bytes (left alone).
    pub(crate) hash_collisions: u64,
    /// Times a survivor was full (refcount at the maximum) and a duplicate became
    /// a survivor instead.
    pub(crate) saturated: u64,
    /// Bytes read to hash and compare.
    pub(crate) bytes_read: u64,
}

fn read_cluster<F: ReadAt + ?Sized>(file: &F, cluster: u64, cb: u32, buf: &mut [u8]) -> Result<()> {
    let off = cluster << cb;
    file.read_exact_at(buf, off)
        .ctx(|| format!("reading the data cluster at {off:#x}"))
}

/// Hashes every host cluster of `scan` and plans the remaps (see the module doc).
pub(crate) fn plan<F: ReadAt + ?Sized>(
    file: &F,
    scan: &Scan,
    cluster_bits: u32,
    max_refcount: u64,
) -> Result<Plan> {
    let cs = 1u64 << cluster_bits;
    let mut plan = Plan::default();
    // (hash, host index) of every cluster, then sorted: groups are runs.
    let mut keyed: Vec<([u8; 16], usize)> = Vec::with_capacity(scan.hosts.len());
    let mut buf = Vec::new();
    let mut i = 0;
    while i < scan.hosts.len() {
        // A run of adjacent clusters, at most READ_CHUNK bytes.
        let mut j = i + 1;
        while j < scan.hosts.len()
            && scan.hosts[j].cluster == scan.hosts[j - 1].cluster + 1
            && ((j - i + 1) as u64) * cs <= READ_CHUNK
        {
            j += 1;
        }
        let len = (j - i) as u64 * cs;
        buf.resize(len as usize, 0); // ≤ READ_CHUNK
        let off = scan.hosts[i].cluster << cluster_bits;
        file.read_exact_at(&mut buf, off)
            .ctx(|| format!("reading the data clusters at {off:#x}"))?;
        plan.bytes_read += len;
        for (k, chunk) in buf.chunks_exact(cs as usize).enumerate() {
            let h = blake3::hash(chunk);
            let mut key = [0u8; 16];
            key.copy_from_slice(&h.as_bytes()[..16]);
            keyed.push((key, i + k));
        }
        i = j;
    }
    plan.clusters_hashed = keyed.len() as u64;
    keyed.sort_unstable();
    let mut survivor = vec![0u8; cs as usize];
    let mut dup = vec![0u8; cs as usize];
    for group in keyed.chunk_by(|a, b| a.0 == b.0) {
        if group.len() < 2 {
            continue;
        }
        let mut members: Vec<usize> = group.iter().map(|g| g.1).collect();
        let host = |m: usize| -> &Host { &scan.hosts[m] };
        // Clusters that stay anyway first, then by offset.
        members.sort_unstable_by_key(|&m| (host(m).removable(), host(m).cluster));
        let mut cur = members[0];
        let mut cur_rc = host(cur).rc;
        read_cluster(file, host(cur).cluster, cluster_bits, &mut survivor)?;
        plan.bytes_read += cs;
        for &m in &members[1..] {
            let h = host(m);
            if !h.removable() {
                // It stays; it can take the remaps if the current survivor is full.
                if cur_rc >= max_refcount && h.rc < max_refcount {
                    read_cluster(file, h.cluster, cluster_bits, &mut dup)?;
                    plan.bytes_read += cs;
                    if dup == survivor {
                        cur = m;
                        cur_rc = h.rc;
                    }
                }
                continue;
            }
            read_cluster(file, h.cluster, cluster_bits, &mut dup)?;
            plan.bytes_read += cs;
            if dup != survivor {
                plan.hash_collisions += 1;
                continue;
            }
            match cur_rc.checked_add(h.n) {
                Some(rc) if rc <= max_refcount => {
                    plan.remaps.push(Remap { from: m, to: cur });
                    cur_rc = rc;
                }
                _ => {
                    // The survivor is full: this duplicate stays and takes the next.
                    plan.saturated += 1;
                    cur = m;
                    cur_rc = h.rc;
                }
            }
        }
    }
    Ok(plan)
}
