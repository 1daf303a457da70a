//! The plan: which host clusters hold the same bytes, which one of each group
//! stays (the survivor) and which are remapped to it and freed.
//!
//! Every candidate cluster is read once, in file order, and hashed (BLAKE3,
//! 128 bits) to find groups; a hash only proposes a pair: the two clusters are
//! compared byte for byte before a remap is planned (as the kernel's
//! FIDEDUPERANGE compares before it shares). The survivor of a group is a cluster
//! that must stay anyway (a snapshot or a skipped table refers to it) or else,
//! with [`Survivors::LowestOffset`] (`--compact`), the one at the lowest offset,
//! so that compaction has less to move; with [`Survivors::LongRuns`] (plain
//! dedup), the one whose staying splits the fewest runs of freed clusters (see
//! [`choose_survivors`]): each run costs one hole punch, and on a file system
//! mounted with `discard` each punch waits for the device. A survivor takes
//! remaps while its refcount stays within the image's maximum
//! (2^refcount_bits − 1); a remap that would pass it makes the duplicate the
//! group's next survivor instead.

use crate::error::{IoContext, Result};
use crate::io::ReadAt;

use super::scan::{Host, Scan};

/// Bytes read at once while hashing (runs of adjacent clusters).
const READ_CHUNK: u64 = 4 << 20;

/// How the survivor of a group of identical clusters is chosen (among those
/// that may be freed; a cluster that must stay anyway always comes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Survivors {
    /// The one at the lowest offset (`--compact` moves less).
    LowestOffset,
    /// The one that leaves the freed clusters in the fewest runs of adjacent
    /// clusters (fewest hole punches).
    LongRuns,
}

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
    survivors: Survivors,
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
    let preferred = match survivors {
        Survivors::LowestOffset => Vec::new(),
        Survivors::LongRuns => choose_survivors(scan, &keyed),
    };
    let is_preferred = |m: usize| preferred.get(m).copied().unwrap_or(false);
    let mut survivor = vec![0u8; cs as usize];
    let mut dup = vec![0u8; cs as usize];
    for group in keyed.chunk_by(|a, b| a.0 == b.0) {
        if group.len() < 2 {
            continue;
        }
        let mut members: Vec<usize> = group.iter().map(|g| g.1).collect();
        let host = |m: usize| -> &Host { &scan.hosts[m] };
        // Clusters that stay anyway first, then the preferred survivor, then by
        // offset.
        members.sort_unstable_by_key(|&m| (host(m).removable(), !is_preferred(m), host(m).cluster));
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

/// Picks, for every group of equal hashes (runs of `keyed`, sorted by hash)
/// none of whose clusters must stay anyway, the cluster to keep so that the
/// clusters freed form few runs of adjacent clusters: each run is one hole
/// punch. Returns, per index in [`Scan::hosts`], whether it is the preferred
/// survivor of its group.
///
/// Starting from the lowest offset, each group's survivor moves to the member
/// whose staying costs the fewest runs given its neighbours (+1 between two
/// freed clusters: it splits a run; −1 between two kept ones: its own run
/// disappears; 0 otherwise; ties keep the current one, then the lowest
/// offset), over a few passes until nothing changes. A heuristic: the bytes are
/// compared afterwards as always, and the refcount maximum may still make more
/// members stay. On the 2 GiB benchmark (35% random copies) the runs, joined
/// across flush groups, fall from 7 513 to 4 478 (10 127 punches before, one
/// flush group at a time; 2 317 with [`bridges`]).
pub(crate) fn choose_survivors(scan: &Scan, keyed: &[([u8; 16], usize)]) -> Vec<bool> {
    const PASSES: usize = 6;
    let hosts = &scan.hosts;
    let mut freed = vec![false; hosts.len()];
    let mut survivor = vec![false; hosts.len()];
    // The groups with a choice: their members, and the current survivor.
    let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
    for group in keyed.chunk_by(|a, b| a.0 == b.0) {
        if group.len() < 2 {
            continue;
        }
        if group.iter().any(|g| !hosts[g.1].removable()) {
            // A cluster that stays anyway survives: every other one is freed.
            for g in group {
                freed[g.1] = hosts[g.1].removable();
            }
            continue;
        }
        let members: Vec<usize> = group.iter().map(|g| g.1).collect();
        // Hosts are sorted by cluster: the lowest index is the lowest offset.
        let first = *members.iter().min().expect("two members or more");
        for &m in &members {
            freed[m] = m != first;
        }
        groups.push((members, first));
    }
    // Whether the neighbour of host `m` on side `d` (its cluster ± 1) is freed.
    let neighbour_freed = |freed: &[bool], m: usize, left: bool| -> bool {
        let n = if left { m.checked_sub(1) } else { Some(m + 1) };
        n.filter(|&n| n < hosts.len())
            .filter(|&n| hosts[n].cluster.abs_diff(hosts[m].cluster) == 1)
            .is_some_and(|n| freed[n])
    };
    let cost = |freed: &[bool], m: usize| -> i32 {
        match (
            neighbour_freed(freed, m, true),
            neighbour_freed(freed, m, false),
        ) {
            (true, true) => 1,
            (false, false) => -1,
            _ => 0,
        }
    };
    for _ in 0..PASSES {
        let mut changed = false;
        for (members, cur) in &mut groups {
            freed[*cur] = true;
            let mut best = *cur;
            let mut best_cost = cost(&freed, best);
            for &m in members.iter() {
                let c = cost(&freed, m);
                if c < best_cost || (c == best_cost && m < best && best != *cur) {
                    best = m;
                    best_cost = c;
                }
            }
            freed[best] = false;
            if best != *cur {
                *cur = best;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for (_, cur) in groups {
        survivor[cur] = true;
    }
    survivor
}

/// Moves that join runs of freed clusters (plain dedup): one or two adjacent
/// clusters in use between two freed ones (a *bridge*) move into freed
/// clusters between two in use (*islands*). The bridge's place then joins the
/// two runs around it and each island is filled: a one-cluster bridge saves two
/// hole punches for one cluster written, a two-cluster one three for two. The
/// one-cluster bridges go first. Returns `(index in Scan::hosts of a bridge
/// cluster, island cluster)`, at most `budget` of them, in host order.
///
/// A bridge cluster is one every reference of which `dedup` may change and
/// that no remap touches (a survivor gains references the scan did not see); an
/// island next to a bridge is left out (filling it would keep the bridge's
/// runs apart).
pub(crate) fn bridges(scan: &Scan, remaps: &[Remap], budget: usize) -> Vec<(usize, u64)> {
    if budget == 0 || remaps.is_empty() {
        return Vec::new();
    }
    let hosts = &scan.hosts;
    let mut freed: Vec<u64> = remaps.iter().map(|r| hosts[r.from].cluster).collect();
    freed.sort_unstable();
    let is_freed = |c: Option<u64>| c.is_some_and(|c| freed.binary_search(&c).is_ok());
    let mut touched = vec![false; hosts.len()];
    for r in remaps {
        touched[r.from] = true;
        touched[r.to] = true;
    }
    let movable = |i: usize| !touched[i] && hosts[i].removable();
    // Host i and the next one, if it is the next cluster and movable too.
    let next = |i: usize| {
        Some(i + 1)
            .filter(|&j| j < hosts.len() && hosts[j].cluster == hosts[i].cluster + 1 && movable(j))
    };
    let mut ones = Vec::new();
    let mut twos: Vec<(usize, usize)> = Vec::new();
    for i in (0..hosts.len()).filter(|&i| movable(i)) {
        let c = hosts[i].cluster;
        if !is_freed(c.checked_sub(1)) {
            continue;
        }
        if is_freed(c.checked_add(1)) {
            ones.push(i);
        } else if let Some(j) = next(i).filter(|_| is_freed(c.checked_add(2))) {
            twos.push((i, j));
        }
    }
    // Freed clusters between two in use, not next to a one-cluster bridge.
    let near_ones: Vec<u64> = ones.iter().map(|&i| hosts[i].cluster).collect();
    let near = |list: &[u64], c: Option<u64>| c.is_some_and(|c| list.binary_search(&c).is_ok());
    let islands: Vec<u64> = freed
        .iter()
        .copied()
        .filter(|&f| {
            let (l, r) = (f.checked_sub(1), f.checked_add(1));
            !is_freed(l) && !is_freed(r) && !near(&near_ones, l) && !near(&near_ones, r)
        })
        .collect();
    let mut used = vec![false; islands.len()];
    let mut out: Vec<(usize, u64)> = Vec::new();
    for (k, i) in ones.into_iter().enumerate().take(budget.min(islands.len())) {
        out.push((i, islands[k]));
        used[k] = true;
    }
    // Two-cluster bridges whose runs are not islands filled above, into the
    // islands left that are not next to one of them.
    let filled = |c: Option<u64>| {
        c.and_then(|c| islands.binary_search(&c).ok())
            .is_some_and(|k| used[k])
    };
    twos.retain(|&(i, j)| {
        !filled(hosts[i].cluster.checked_sub(1)) && !filled(hosts[j].cluster.checked_add(1))
    });
    let mut near_twos: Vec<u64> = twos
        .iter()
        .flat_map(|&(i, j)| [hosts[i].cluster, hosts[j].cluster])
        .collect();
    near_twos.sort_unstable();
    let mut left = islands.iter().zip(&used).filter_map(|(&f, &u)| {
        (!u && !near(&near_twos, f.checked_sub(1)) && !near(&near_twos, f.checked_add(1)))
            .then_some(f)
    });
    for (i, j) in twos {
        if out.len() + 2 > budget {
            break;
        }
        let (Some(f), Some(g)) = (left.next(), left.next()) else {
            break;
        };
        out.push((i, f));
        out.push((j, g));
    }
    out.sort_unstable();
    out
}
