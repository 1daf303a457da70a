//! Refcount table and refcount blocks.
//!
//! The refcount table is a contiguous array of big-endian u64 entries:
//!
//! | bits  | meaning                                                 |
//! |-------|---------------------------------------------------------|
//! | 0–8   | reserved (0)                                            |
//! | 9–63  | offset of a refcount block (cluster aligned; 0 = none)  |
//!
//! A refcount block is one cluster holding `cluster_size · 8 / refcount_bits`
//! entries; host cluster `c` is counted in block `c / entries`, slot `c % entries`.
//! Widths 1, 2 and 4 are packed LSB-first within a byte; 8, 16, 32 and 64 are
//! big-endian. The largest refcount is `2^refcount_bits − 1`.

/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Offset field of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = !REFT_RESERVED_MASK;

/// Entries in one refcount block.
pub fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> refcount_order
}

/// The largest refcount a width can hold.
pub fn max_refcount(refcount_order: u32) -> u64 {
    let bits = 1u32 << refcount_order;
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Reads slot `i` of a refcount block. `block` must hold the slot
/// (`i < entries_per_block`); callers compute `i` as `c % entries_per_block`.
pub fn get(block: &[u8], refcount_order: u32, i: u64) -> u64 {
    let i = i as usize; // i < entries_per_block ≤ 2^24 (cluster 2 MiB at 1 bit)
    match refcount_order {
        0..=2 => {
            let bits = 1usize << refcount_order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            let shift = (i % per_byte) * bits;
            u64::from((byte >> shift) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * i..4 * i + 4].try_into().expect("4 bytes"),
        )),
        _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().expect("8 bytes")),
    }
}

/// Writes slot `i` of a refcount block; `value` must not exceed
/// [`max_refcount`] (checked in debug builds).
pub fn set(block: &mut [u8], refcount_order: u32, i: u64, value: u64) {
    debug_assert!(value <= max_refcount(refcount_order));
    let i = i as usize;
    match refcount_order {
        0..=2 => {
            let bits = 1usize << refcount_order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sub_byte_widths_are_lsb_first() {
        let mut b = [0u8; 4];
        set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 0b0000_0001);
        set(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b0000_1101);
        set(&mut b, 2, 1, 0xa);
        assert_eq!(b[0], 0xad);
        set(&mut b, 4, 1, 0x1234);
        assert_eq!(&b[2..4], &[0x12, 0x34]);
    }

    proptest! {
        #[test]
        fn get_inverts_set_for_every_width(order in 0u32..=6, vals in proptest::collection::vec(any::<u64>(), 1..64)) {
            let cb = 9;
            let n = entries_per_block(cb, order);
            let mut block = vec![0u8; 1 << cb];
            let max = max_refcount(order);
            let vals: Vec<u64> = vals.iter().map(|v| v & max).collect();
            for (i, v) in vals.iter().enumerate() {
                set(&mut block, order, i as u64 % n, *v);
            }
            // Later writes to the same slot win; check the last value per slot.
            for (i, v) in vals.iter().enumerate() {
                let slot = i as u64 % n;
                let last = vals.iter().enumerate().rfind(|(j, _)| *j as u64 % n == slot).unwrap().1;
                let _ = v;
                prop_assert_eq!(get(&block, order, slot), *last);
            }
        }
    }
}
