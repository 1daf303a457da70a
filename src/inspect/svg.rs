//! A picture of an image: a grid of at most [`MAX_CELLS`] cells, each covering
//! an equal run of guest bytes, coloured by what most of its bytes are.

use std::fmt::Write as _;

use super::map::MapEntry;

/// Upper bound on the number of cells.
pub const MAX_CELLS: u64 = 4096;
const COLUMNS: u64 = 64;
const CELL: u64 = 10;

/// What a byte of the guest disk is, for the picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Zero,
    Unique,
    Shared,
    Compressed,
    Backing,
}

const CLASSES: [(Class, &str, &str); 5] = [
    (Class::Zero, "#e8e8e8", "zero / unallocated"),
    (Class::Unique, "#4c8bf5", "data, unique host cluster"),
    (
        Class::Shared,
        "#e8710a",
        "data, shared host cluster (refcount > 1)",
    ),
    (Class::Compressed, "#188038", "compressed"),
    (Class::Backing, "#9334e6", "from a backing file"),
];

fn class(e: &MapEntry) -> Class {
    if !e.data || e.zero {
        Class::Zero
    } else if e.depth > 0 {
        Class::Backing
    } else if e.compressed {
        Class::Compressed
    } else if e.refcount.unwrap_or(1) > 1 {
        Class::Shared
    } else {
        Class::Unique
    }
}

/// Renders `entries` (from `map` with refcounts) covering `size` guest bytes.
pub fn render(entries: &[MapEntry], size: u64, title: &str) -> String {
    let cells = size.clamp(1, MAX_CELLS);
    let per = size.div_ceil(cells).max(1);
    let cells = size.div_ceil(per).max(1);
    // Bytes of each class per cell.
    let mut bytes = vec![[0u64; 5]; cells as usize];
    let mut totals = [0u64; 5];
    for e in entries {
        let c = CLASSES
            .iter()
            .position(|(k, _, _)| *k == class(e))
            .expect("listed");
        totals[c] += e.length;
        let mut off = e.start;
        let end = e.start + e.length;
        while off < end {
            let cell = off / per;
            let cell_end = ((cell + 1) * per).min(end);
            bytes[cell as usize][c] += cell_end - off;
            off = cell_end;
        }
    }
    let rows = cells.div_ceil(COLUMNS);
    let legend_h = 20 * CLASSES.len() as u64 + 10;
    let width = COLUMNS * CELL + 20;
    let height = 40 + rows * CELL + legend_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="20">{} — {} cells of {} bytes</text>"#,
        escape(title),
        cells,
        per
    );
    for (i, b) in bytes.iter().enumerate() {
        let (best, _) = b
            .iter()
            .enumerate()
            .max_by_key(|(k, v)| (**v, std::cmp::Reverse(*k)))
            .expect("five classes");
        let (x, y) = (
            10 + (i as u64 % COLUMNS) * CELL,
            30 + (i as u64 / COLUMNS) * CELL,
        );
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{y}" width="{w}" height="{w}" fill="{}"><title>{}</title></rect>"#,
            CLASSES[best].1,
            i as u64 * per,
            w = CELL - 1
        );
    }
    let ly = 40 + rows * CELL;
    for (k, (_, colour, name)) in CLASSES.iter().enumerate() {
        let y = ly + 20 * k as u64;
        let _ = writeln!(
            s,
            r#"<rect x="10" y="{y}" width="12" height="12" fill="{colour}"/><text x="28" y="{}">{name}: {} bytes</text>"#,
            y + 11,
            totals[k]
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
